"""Carrying out a StepPlan: begin (slots change hands), execute (the decoder calls), update (tokens, events).

One turn of generation, for the continuous-batching scheduler's thread and LanguageModel.generate alike:

    plan = schedule(state)                        # pure: what to do (generation/schedule.py)
    begin(state, stats, plan)                     # evicted slots freed, admitted requests leave the queue
    outputs = execute(plan, session, state.cache, constrained_rows(state, plan), masks)
                                                  # ONNX Runtime: prefix copies, one decode call, one prompt chunk;
                                                  # meanwhile the grammar masks of constrained rows
    for ticket, item in update(state, stats, plan, outputs):
        ticket.emit(item)                         # text pieces, then a Generation; finished slots are free

``Steps`` bundles a state, a session and their statistics; ``Steps.run(seq)`` drives one sequence in the
caller's thread (the synchronous API), the scheduler's thread calls ``plan()`` under its lock,
then ``carry_out(plan)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from forwardpass.generation.constraint import Constraint, MaskWorker
from forwardpass.generation.schedule import PrefixCache, SchedulerState, StepPlan, Ticket, schedule
from forwardpass.generation.sequence import Generation, Sequence
from forwardpass.stats import GenerationStats

Event = tuple[Ticket, Any]  # (ticket, str piece | Generation | Exception)


class Decoder(Protocol):
    """What execute() needs of a decoder session (DecoderSession; a fake one in the unit tests)."""

    def decode(self, tokens: list[int], positions: list[int], logit_rows: int = 0) -> np.ndarray: ...
    def prefill(self, slot: int, tokens: list[int], start: int) -> np.ndarray: ...
    def prefill_rows(self, first: int, tokens: Seq[Seq[int]], starts: Seq[int], logit_rows: int) -> np.ndarray: ...
    def prefill_pooled(self, slot: int, tokens: list[int], start: int) -> tuple[np.ndarray, np.ndarray]: ...
    def read_prefix(self, slot: int, length: int) -> list[np.ndarray]: ...
    def write_prefix(self, slot: int, arrays: list[np.ndarray], length: int) -> None: ...


@dataclass(frozen=True)
class StepOutputs:
    """What the decoder returned for a plan."""

    decode: np.ndarray | None = None  # (logit_rows, V): the decode rows' next-token logits
    prefill: np.ndarray | None = None  # (V,) after the chunk's last token
    stored: list[np.ndarray] | None = None  # the finished prompt's prefix KV, for the prefix cache
    decode_seconds: float = 0.0
    allowed: dict[int, np.ndarray] = field(default_factory=dict)  # slot -> (V,) grammar mask, constrained rows
    hidden_sum: np.ndarray | None = None  # (C,) a pooling sequence's chunk: its final hidden states summed
    also: dict[int, np.ndarray] = field(default_factory=dict)  # slot -> (V,): an ``also`` chunk ending its prompt
    also_stored: dict[int, list[np.ndarray]] = field(default_factory=dict)  # slot -> its prompt's prefix KV


def begin(state: SchedulerState, stats: GenerationStats, plan: StepPlan) -> None:
    """Evicted requests leave their slots, admitted ones take theirs and leave the queue (bookkeeping only; run it
    with schedule() under the lock that submit and cancel take)."""
    for slot in plan.evict:
        state.active[slot] = None
        stats.cancelled += 1
    now = time.perf_counter()
    for a in plan.admit:
        ticket = a.ticket
        if state.waiting and state.waiting[0] is ticket:
            state.waiting.popleft()
        else:
            state.waiting.remove(ticket)
        ticket.slot, ticket.filled = a.slot, a.cached
        ticket.seq.cached_tokens = a.cached
        state.active[a.slot] = ticket
        stats.queue_time.observe(now - ticket.queued_at)
        stats.prompt_tokens += len(ticket.seq.prompt)
        if a.prefix is not None:
            state.cache.touch(a.prefix)
            stats.prefix_hits += 1
            stats.prefix_saved_tokens += a.cached
        elif a.source >= 0:  # a fork: the first choice's prompt, not computed again
            stats.prefix_saved_tokens += a.cached
        else:
            stats.prefix_misses += 1
    stats.queued, stats.active = len(state.waiting), state.running


def constrained_rows(state: SchedulerState, plan: StepPlan) -> list[tuple[int, Constraint]]:
    """(slot, constraint) of the rows this plan samples a token for whose output follows a grammar."""
    rows = []
    if plan.decode is not None:
        for slot in plan.decode.rows:
            ticket = state.active[slot]
            if ticket is not None and ticket.seq.constraint is not None:
                rows.append((slot, ticket.seq.constraint))
    for p in (plan.prefill, *plan.also):
        if p is not None and p.last and p.ticket.seq.constraint is not None:
            rows.append((p.slot, p.ticket.seq.constraint))
    return rows


def execute(plan: StepPlan, session: Decoder, cache: PrefixCache,
            constrained: Seq[tuple[int, Constraint]] = (), masks: MaskWorker | None = None) -> StepOutputs:  # fmt: skip
    """Run ``plan`` on the decoder: copy cached prefixes into admitted slots, one decode call, one prefill call
    (a prompt chunk, or the chunks of several slots).
    The ``constrained`` rows' grammar masks are computed by ``masks`` meanwhile (both release the GIL)."""
    pending = masks.start(constrained) if constrained and masks is not None else None
    for a in plan.admit:
        if a.prefix is not None:
            session.write_prefix(a.slot, cache.entries[a.prefix], a.cached)
        elif a.source >= 0:  # a fork: the first choice's prompt KV, slot to slot
            session.write_prefix(a.slot, session.read_prefix(a.source, a.cached), a.cached)
    decode, seconds = None, 0.0
    if plan.decode is not None:
        d = plan.decode
        started = time.perf_counter()
        decode = session.decode(list(d.tokens), list(d.positions), logit_rows=d.logit_rows)
        seconds = time.perf_counter() - started
    prefill = stored = hidden = None
    also: dict[int, np.ndarray] = {}
    also_stored: dict[int, list[np.ndarray]] = {}
    if plan.batch is not None:  # the prefill chunk and its ``also`` chunks in one call
        b = plan.batch
        logits = session.prefill_rows(b.first, b.tokens, b.starts, b.logit_rows)
        for p in (plan.prefill, *plan.also):
            assert p is not None
            row = logits[min(p.slot - b.first, b.logit_rows - 1)]  # a chunk not ending its prompt needs none
            if p is plan.prefill:
                prefill = row
            elif p.last:
                also[p.slot] = row
            if p.last and p.store:
                if p is plan.prefill:
                    stored = session.read_prefix(p.slot, p.store)
                else:
                    also_stored[p.slot] = session.read_prefix(p.slot, p.store)
    elif plan.prefill is not None:
        p = plan.prefill
        if p.ticket.seq.pooling:
            prefill, hidden = session.prefill_pooled(p.slot, p.tokens, p.start)
        else:
            prefill = session.prefill(p.slot, p.tokens, p.start)
        if p.last and p.store:
            stored = session.read_prefix(p.slot, p.store)
    allowed = pending.result() if pending is not None else {}
    return StepOutputs(decode, prefill, stored, seconds, allowed, hidden, also, also_stored)


def update(state: SchedulerState, stats: GenerationStats, plan: StepPlan, outputs: StepOutputs) -> list[Event]:
    """Sample each row's next token from its logits; the events to emit, in order. A finished sequence's slot is
    free when its Generation is in the list."""
    events: list[Event] = []
    if plan.decode is not None:
        assert outputs.decode is not None
        stats.decode_steps += 1
        stats.decode_rows += len(plan.decode.rows)
        stats.step_time.observe(outputs.decode_seconds)
        for slot in plan.decode.rows:
            _advance(state, stats, slot, outputs.decode[slot], events, outputs.allowed.get(slot))
    p = plan.prefill
    if p is not None:
        assert outputs.prefill is not None
        p.ticket.filled = p.end
        if p.last and outputs.stored is not None:
            state.cache.store(p.ticket.seq.prompt[: p.store], outputs.stored)
            stats.prefix_cache_bytes = state.cache.bytes
        if p.ticket.seq.pooling:  # an embedding: no token to sample; done after its last chunk
            assert outputs.hidden_sum is not None
            p.ticket.seq.pool(outputs.hidden_sum, p.last)
            if p.last:
                events.append((p.ticket, finish(state, stats, p.slot)))
        elif p.last:
            _advance(state, stats, p.slot, outputs.prefill, events, outputs.allowed.get(p.slot))
    for p in plan.also:  # chunks read in the prefill's call (never an embedding's)
        p.ticket.filled = p.end
        if p.last and p.slot in outputs.also_stored:
            state.cache.store(p.ticket.seq.prompt[: p.store], outputs.also_stored[p.slot])
            stats.prefix_cache_bytes = state.cache.bytes
        if p.last:
            _advance(state, stats, p.slot, outputs.also[p.slot], events, outputs.allowed.get(p.slot))
    return events


def _advance(state: SchedulerState, stats: GenerationStats, slot: int, logits: np.ndarray, events: list[Event],
             allowed: np.ndarray | None) -> None:  # fmt: skip
    ticket = state.active[slot]
    assert ticket is not None
    now = time.perf_counter()
    piece = ticket.seq.advance(logits, allowed)
    if ticket.last_token_at == 0.0:
        stats.ttft.observe(now - ticket.queued_at)
    else:
        stats.itl.observe(now - ticket.last_token_at)
    ticket.last_token_at = now
    stats.token(now)
    if piece:
        events.append((ticket, piece))
    if ticket.seq.finish_reason:
        events.append((ticket, finish(state, stats, slot)))


def finish(state: SchedulerState, stats: GenerationStats, slot: int) -> Generation:
    """Free ``slot``; its sequence's Generation."""
    ticket = state.active[slot]
    assert ticket is not None
    state.active[slot] = None
    ticket.finished = True
    stats.active = state.running
    result = ticket.seq.result()
    stats.finished(result)
    return result


def fail_running(state: SchedulerState, stats: GenerationStats, error: Exception) -> list[Event]:
    """Free every slot (a forward pass failed: the requests in it fail, not the server); their error events."""
    events: list[Event] = []
    for slot, ticket in enumerate(state.active):
        if ticket is not None:
            state.active[slot] = None
            ticket.finished = True
            events.append((ticket, error))
    stats.active = 0
    return events


class Steps:
    """A decoder session with its scheduling state and statistics: the one generation path."""

    def __init__(self, session: Decoder, state: SchedulerState, stats: GenerationStats):
        self.session, self.state, self.stats = session, state, stats
        self._masks: MaskWorker | None = None  # started with the first constrained request

    def plan(self) -> StepPlan:
        """The next plan, already begun (call it under the lock that guards ``state.waiting``)."""
        plan = schedule(self.state)
        begin(self.state, self.stats, plan)
        return plan

    def carry_out(self, plan: StepPlan) -> list[Event]:
        """Execute a begun plan and update the state from its outputs; the events to emit."""
        constrained = constrained_rows(self.state, plan)
        if constrained and self._masks is None:
            self._masks = MaskWorker()
        outputs = execute(plan, self.session, self.state.cache, constrained, self._masks)
        return update(self.state, self.stats, plan, outputs)

    def close(self) -> None:
        """Stop the grammar masks' worker thread, if one was started."""
        if self._masks is not None:
            self._masks.close()

    def turn(self) -> list[Event]:
        """One whole step (the state owned by this thread alone): plan, execute, update."""
        return self.carry_out(self.plan())

    def run(self, seq: Sequence) -> Iterator[str | Generation]:
        """Generate ``seq`` in this thread (the state must not be shared with a running scheduler): its text
        pieces, then its Generation. Leaving the iteration early cancels it; an error in a step is raised."""
        ticket = Ticket(seq, lambda item: None)
        self.state.waiting.append(ticket)
        self.stats.queued = len(self.state.waiting)
        done = False
        try:
            while not done:
                try:
                    events = self.turn()
                except Exception as exc:
                    fail_running(self.state, self.stats, exc)
                    raise
                for owner, item in events:
                    if owner is ticket:
                        done = isinstance(item, Generation)
                        yield item
        finally:
            if not done:  # its slot is freed at the next turn, as a cancelled request's in the scheduler
                ticket.cancelled = True
                if ticket in self.state.waiting:
                    self.state.waiting.remove(ticket)
