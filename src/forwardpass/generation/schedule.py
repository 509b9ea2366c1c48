"""Deciding one step of continuous batching: a pure ``schedule(state) -> StepPlan``, no model involved.

The state is plain data: ``slots`` KV rows (each free or holding a Ticket), the queue of waiting
tickets, the prompt-prefix cache. A plan says, for one turn of the decoder:

1. ``evict``: slots whose request was cancelled (client gone); they are free for this turn's admissions;
2. ``admit``: waiting requests into free slots (lowest first, so decode batches stay short), each with
   its longest common prefix with a cached prompt (to the token), whose KV is copied into its slot; a fork
   (one of ``n`` choices of a request) waits until the first choice's prompt is in its slot, then copies
   that KV but for the prompt's last token, whose logits it computes itself (one prefill for n decoding rows);
3. ``decode``: one token for every sequence past its prompt, all rows in one call; rows still in their
   prompt, or free, ride along as dummies at a position their next prompt chunk overwrites, and a lone
   stream gets a dummy (MIN_ROWS);
4. ``prefill``: one prompt chunk (up to the next multiple of ``chunk``, never one token alone) of the oldest
   sequence still in its prompt, so running streams keep flowing while new prompts are read; when it
   ends the prompt, how many leading tokens to keep in the prefix cache;
5. ``also`` and ``batch`` (a graph that computes each row alone, ``batch_prefill``): the prompts of neighbouring
   slots join the oldest one's call with as many tokens, a row ending its chunk sooner starting earlier (the
   tokens it re-reads give the same KV, bit for bit); eight chats arriving together read their prompts in
   one call, not eight turns.

Which sequences finish is known only from the tokens sampled (a stop token, a stop string, max_tokens):
``update`` (generation/steps.py) decides that from the outputs and frees their slots.

    state = SchedulerState(slots=2, chunk=64, cache=PrefixCache(0))
    state.waiting.append(Ticket(seq, emit))
    plan = schedule(state)          # StepPlan(admit=(Admission(ticket, slot=0, cached=0),), prefill=...)
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forwardpass.generation.sequence import Sequence

Emit = Callable[[Any], object]  # called with a str piece | Generation | Exception; what it returns is ignored
# MatMulNBits' one-row kernel sums in another order than its many-row kernels (2e-7 relative), and int8
# activation rounding grows that to ~0.5 logits after 30 layers: a stream would sample differently alone
# than next to others. Every decode call of such a graph therefore has at least two rows (rows 2..8 agree bit
# for bit). A graph on forwardpass's own kernels computes each row alone (DecoderSession.row_invariant): 1 row.
MIN_ROWS = 2


# The fewest prompt tokens a prefill call runs after a cached prefix, and the shortest chunk: the many-row
# kernels give every position the same KV and logits however the prompt is cut into chunks of two or more
# tokens (bit for bit, measured), a one-token chunk takes the one-row kernel (see MIN_ROWS). So a prompt may
# resume from any cached length, to the token, and still compute exactly what a cold run computes.
MIN_CHUNK = 2

# The most prompt tokens one batched prefill call reads (rows x tokens) when no stream is decoding: about half
# a second of prompt at ~1,100 tokens/s on two cores. While streams decode, a call reads at most ``chunk``
# tokens, as an unbatched one does, so their next token waits no longer than it did.
BATCH_TOKENS = 512


class PrefixCache:
    """KV of earlier prompts, reused to the token: least recently used out first, bounded in bytes.

    A new prompt reuses the longest common prefix with any stored prompt (as llama-server's slots reuse their
    last prompt), leaving at least MIN_CHUNK tokens to compute.
    """

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[tuple[int, ...], list[np.ndarray]] = OrderedDict()
        self.bytes = 0

    def find(self, ids: list[int]) -> tuple[int, tuple[int, ...] | None]:
        """(usable length, key) of the longest cached prefix of ``ids``, leaving MIN_CHUNK tokens to run;
        reads only (touch() marks the entry used)."""
        best, found = 0, None
        wanted = np.asarray(ids, dtype=np.int64)
        for key in self.entries:
            n = min(len(key), len(ids) - MIN_CHUNK)
            if n <= best:
                continue
            same = np.asarray(key[:n], dtype=np.int64) == wanted[:n]
            common = n if same.all() else int(np.argmin(same))
            if common > best:
                best, found = common, key
        return (best, found) if found is not None else (0, None)

    def touch(self, key: tuple[int, ...]) -> None:
        """Mark an entry as just used (the last to be evicted)."""
        if key in self.entries:
            self.entries.move_to_end(key)

    def lookup(self, ids: list[int]) -> tuple[int, list[np.ndarray] | None]:
        """(usable length, arrays) for the longest cached prefix of ``ids``; the entry counts as used."""
        length, key = self.find(ids)
        if key is None:
            return 0, None
        self.touch(key)
        return length, self.entries[key]

    def wants(self, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` are worth storing: the whole prompt, unless the cache is off or a
        stored prompt already starts with it."""
        if len(ids) <= MIN_CHUNK or self.budget <= 0:
            return 0
        key = tuple(ids)
        for cached in self.entries:
            if len(cached) >= len(key) and cached[: len(key)] == key:
                return 0
        return len(ids)

    def store(self, ids: list[int], arrays: list[np.ndarray]) -> None:
        """Keep ``arrays`` (KV of positions 0..len(ids)-1) for ``ids``; stored prompts that ``ids`` extends
        (an earlier turn of the same chat) are dropped: the new entry serves them too. Nothing is kept when a
        longer stored prompt starts with ``ids`` (one stored since wants() was asked, in the same turn)."""
        size = sum(a.nbytes for a in arrays)
        key = tuple(ids)
        if size > self.budget or any(len(k) > len(key) and k[: len(key)] == key for k in self.entries):
            return
        for old in [k for k in self.entries if len(k) <= len(key) and key[: len(k)] == k]:
            self.bytes -= sum(a.nbytes for a in self.entries.pop(old))
        self.entries[key] = arrays
        self.bytes += size
        while self.bytes > self.budget:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= sum(a.nbytes for a in evicted)


@dataclass(eq=False)
class Ticket:
    """A request inside the scheduler."""

    seq: Sequence
    emit: Emit
    slot: int = -1
    filled: int = 0  # prompt tokens already in the slot's KV
    cancelled: bool = False
    queued_at: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0
    parent: Ticket | None = None  # a fork: another choice of the same prompt, whose KV it copies
    finished: bool = False

    @property
    def decoding(self) -> bool:
        return self.filled >= len(self.seq.prompt)

    @property
    def position(self) -> int:
        """Tokens in the KV cache (the next one goes here)."""
        return len(self.seq.prompt) + max(len(self.seq.tokens) - 1, 0)


@dataclass
class SchedulerState:
    """What schedule() reads: the slots, the queue, the prefix cache. No model, no session."""

    slots: int
    chunk: int  # prompt tokens per prefill call, cut at absolute multiples of it
    cache: PrefixCache
    min_rows: int = MIN_ROWS
    batch_prefill: bool = False  # prompts of several slots in one call (a graph computing each row alone)
    active: list[Ticket | None] = field(default_factory=list)
    waiting: deque[Ticket] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if not self.active:
            self.active = [None] * self.slots

    @property
    def running(self) -> int:
        return sum(t is not None for t in self.active)


@dataclass(frozen=True)
class Admission:
    """A waiting request taking a free slot, with ``cached`` prompt tokens from the prefix cache."""

    ticket: Ticket
    slot: int
    cached: int = 0
    prefix: tuple[int, ...] | None = None  # the prefix cache's key of those tokens
    source: int = -1  # a fork: the slot whose first ``cached`` positions it copies (-1: none)


@dataclass(frozen=True)
class DecodeBatch:
    """One decode call: a token at a position for rows 0..len(tokens)-1; ``rows`` are the real ones."""

    rows: tuple[int, ...]
    tokens: tuple[int, ...]
    positions: tuple[int, ...]

    @property
    def logit_rows(self) -> int:
        """Logits are computed for rows 0..rows[-1] only (the padding rows after it need none)."""
        return self.rows[-1] + 1


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens start..end-1 of the request in ``slot``; ``store`` leading prompt tokens go into the
    prefix cache when the chunk ends the prompt (0: none)."""

    ticket: Ticket
    slot: int
    start: int
    end: int
    store: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.ticket.seq.prompt[self.start : self.end]

    @property
    def last(self) -> bool:
        """This chunk ends the prompt: its logits give the first generated token."""
        return self.end == len(self.ticket.seq.prompt)


@dataclass(frozen=True)
class PrefillBatch:
    """One prefill call over KV rows first..first + len(starts) - 1, every row the same number of tokens: the
    chunks' rows, and free slots between them as dummies (tokens 0 at positions a later prompt overwrites)."""

    first: int
    tokens: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]  # each row's first position
    logit_rows: int  # logits for rows first..first + logit_rows - 1 (the last chunk ending its prompt)


@dataclass(frozen=True)
class StepPlan:
    """One turn of the decoder (see the module docstring)."""

    evict: tuple[int, ...] = ()
    admit: tuple[Admission, ...] = ()
    decode: DecodeBatch | None = None
    prefill: PrefillChunk | None = None
    also: tuple[PrefillChunk, ...] = ()  # other slots' chunks, as long as prefill's, in the same call
    batch: PrefillBatch | None = None  # that call, when there are ``also`` chunks

    @property
    def idle(self) -> bool:
        """Nothing to do: no request waiting, running or leaving."""
        return not (self.evict or self.admit or self.decode or self.prefill)


def schedule(state: SchedulerState) -> StepPlan:
    """The next step for ``state``; reads it and changes nothing (steps.begin() and update() apply a plan)."""
    slots: list[Ticket | None] = list(state.active)
    evict = tuple(i for i, t in enumerate(slots) if t is not None and t.cancelled)
    for i in evict:
        slots[i] = None
    admit, filled = [], {}
    queue = iter(state.waiting)
    for slot in (i for i, t in enumerate(slots) if t is None):
        ticket = next((t for t in queue if not t.cancelled and _ready(t, slots)), None)
        if ticket is None:
            break
        parent = ticket.parent
        if parent is not None and parent in slots and parent.filled >= len(ticket.seq.prompt) - 1:
            cached = len(ticket.seq.prompt) - 1  # the first choice's prompt KV; its last token computed here
            admit.append(Admission(ticket, slot, cached, None, slots.index(parent)))
        elif ticket.seq.pooling:  # an embedding needs every position's hidden state: no prefix reuse
            cached = 0
            admit.append(Admission(ticket, slot))
        else:
            cached, key = state.cache.find(ticket.seq.prompt)
            admit.append(Admission(ticket, slot, cached, key))
        slots[slot], filled[slot] = ticket, cached
    prefill, decode = _prefill(state, slots, filled), _decode(state, slots, filled)
    budget = state.chunk if decode is not None else BATCH_TOKENS
    also, batch = _batch(state, slots, filled, prefill, budget) if state.batch_prefill and prefill else ((), None)
    return StepPlan(evict, tuple(admit), decode, prefill, also, batch)


def _ready(ticket: Ticket, slots: list[Ticket | None]) -> bool:
    """A fork waits while its first choice is still reading the prompt (then it copies that KV); once the first
    choice has ended (or was never admitted alongside), it runs as any request."""
    parent = ticket.parent
    if parent is None or parent.finished or parent.cancelled:
        return True
    return parent in slots and parent.filled >= len(ticket.seq.prompt) - 1


def _filled(slots: list[Ticket | None], filled: dict[int, int], i: int) -> int:
    ticket = slots[i]
    assert ticket is not None
    return filled.get(i, ticket.filled)


def _decode(state: SchedulerState, slots: list[Ticket | None], filled: dict[int, int]) -> DecodeBatch | None:
    def decoding(i: int) -> bool:
        t = slots[i]
        return t is not None and not t.cancelled and _filled(slots, filled, i) >= len(t.seq.prompt)

    rows = tuple(i for i in range(len(slots)) if decoding(i))
    if not rows:
        return None
    n = max(rows[-1] + 1, state.min_rows)
    tokens, positions = [0] * n, [0] * n
    for i in range(min(n, len(slots))):
        ticket = slots[i]
        if ticket is None or ticket.cancelled:
            continue
        if decoding(i):
            tokens[i], positions[i] = ticket.seq.tokens[-1], ticket.position
        else:
            positions[i] = _filled(slots, filled, i)  # a dummy: the next prompt chunk starts here and overwrites it
    return DecodeBatch(rows, tuple(tokens), tuple(positions))


def _prefill(state: SchedulerState, slots: list[Ticket | None], filled: dict[int, int]) -> PrefillChunk | None:
    pending = [(t.queued_at, i) for i, t in enumerate(slots)
               if t is not None and not t.cancelled and _filled(slots, filled, i) < len(t.seq.prompt)]  # fmt: skip
    if not pending:
        return None
    _, slot = min(pending)
    ticket = slots[slot]
    assert ticket is not None
    prompt, start = ticket.seq.prompt, _filled(slots, filled, slot)
    end = (start // state.chunk + 1) * state.chunk  # cut at multiples of chunk, each piece MIN_CHUNK or longer
    if end - start < MIN_CHUNK:
        end += state.chunk
    if len(prompt) - end < MIN_CHUNK:
        end = len(prompt)
    store = state.cache.wants(prompt) if end == len(prompt) else 0
    return PrefillChunk(ticket, slot, start, end, store)


def _batch(state: SchedulerState, slots: list[Ticket | None], filled: dict[int, int], first: PrefillChunk,
           budget: int) -> tuple[tuple[PrefillChunk, ...], PrefillBatch | None]:  # fmt: skip
    """The chunks of neighbouring slots that join ``first``'s call (see the module docstring), and the call, of
    at most ``budget`` tokens (rows x T).

    A slot joins when it is in its prompt (not an embedding, whose sums would count a re-read token twice), its
    prompt has at least T tokens, at least half of the T it reads are new, and it does not leave a single token
    for later (MIN_CHUNK); one free slot between joiners is a dummy row (two in a row end the run, as any other
    slot does: a decoding row, whose positions a dummy must not pass)."""
    T = first.end - first.start
    if first.ticket.seq.pooling:
        return (), None

    def join(i: int) -> PrefillChunk | None:
        ticket = slots[i]
        if ticket is None or ticket.cancelled or ticket.seq.pooling:
            return None
        prompt, done = ticket.seq.prompt, _filled(slots, filled, i)
        end = min(len(prompt), done + T)
        if done >= len(prompt) or len(prompt) < T or 2 * (end - done) < T or 0 < len(prompt) - end < MIN_CHUNK:
            return None
        return PrefillChunk(ticket, i, end - T, end, state.cache.wants(prompt) if end == len(prompt) else 0)

    rows: dict[int, PrefillChunk | None] = {first.slot: first}
    most = budget // max(T, 1)
    for step in (-1, 1):
        i = first.slot + step
        while 0 <= i < len(slots) and len(rows) < most:
            chunk = join(i) if slots[i] is not None else None
            if chunk is None and (slots[i] is not None or rows.get(i - step, first) is None):
                break
            rows[i] = chunk
            i += step
    while rows and rows[min(rows)] is None:  # no dummy rows at the ends
        del rows[min(rows)]
    while rows and rows[max(rows)] is None:
        del rows[max(rows)]
    also = tuple(c for i, c in sorted(rows.items()) if c is not None and i != first.slot)
    if not also:
        return (), None
    lo = min(rows)
    order = sorted(rows)
    tokens = tuple(tuple(c.tokens) if (c := rows[i]) else (0,) * T for i in order)
    starts = tuple(c.start if (c := rows[i]) else 0 for i in order)
    ending = [i - lo for i in order if (c := rows[i]) is not None and c.last]
    return also, PrefillBatch(lo, tokens, starts, max(ending, default=0) + 1)

