"""Continuous batching: many generation requests share one decoder, admitted between decode steps.

One thread owns the DecoderSession (``slots`` KV rows). Each turn of its loop:

1. admits waiting requests into free slots (lowest first, so decode batches stay short), copying the
   KV of the longest cached prompt prefix into the slot (PrefixCache);
2. runs one decode step for every sequence past its prompt, all rows in one ONNX Runtime call
   (GroupQueryAttention takes each row's own length); rows still in their prompt or free ride
   along as dummies, writing a position their next prompt chunk overwrites (and a lone stream gets one
   dummy: see MIN_ROWS);
3. runs one prompt chunk (``prefill_chunk`` tokens, cut at absolute multiples of it) for the oldest
   sequence still in its prompt, so running streams keep flowing while new prompts are read.

Chunks cut at fixed positions make a prefix-cache hit compute exactly what a cold run computes.
A cancelled request (client gone) leaves its slot at the next turn: within one decode step.
Results go back through each request's ``emit`` callback (text pieces, then a Generation or an
exception), called on this thread; AsyncGeneration turns them into an async iterator.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forwardpass.errors import ForwardpassError, Overloaded
from forwardpass.generation.sequence import Generation, Sequence
from forwardpass.stats import GenerationStats

log = logging.getLogger("forwardpass.generation")
Emit = Callable[[Any], None]  # str piece | Generation | Exception
# MatMulNBits' one-row kernel sums in another order than its many-row kernels (2e-7 relative), and int8
# activation rounding grows that to ~0.5 logits after 30 layers: a stream would sample differently alone
# than next to others. Every decode call therefore has at least two rows (rows 2..8 agree bit for bit).
MIN_ROWS = 2


class SchedulerClosed(ForwardpassError):
    status = 503
    type = "model_not_ready"


class PrefixCache:
    """KV of prompt prefixes (cut to whole chunks), least recently used out first, bounded in bytes."""

    def __init__(self, budget_bytes: int, chunk: int):
        self.budget, self.chunk = budget_bytes, chunk
        self.entries: OrderedDict[tuple[int, ...], list[np.ndarray]] = OrderedDict()
        self.bytes = 0

    def lookup(self, ids: list[int]) -> tuple[int, list[np.ndarray] | None]:
        """(usable length, arrays) for the longest cached prefix of ``ids``, leaving at least one token to run."""
        best, found = 0, None
        wanted = np.asarray(ids, dtype=np.int64)
        for key in self.entries:
            n = min(len(key), len(ids) - 1)
            if n <= best:
                continue
            same = np.asarray(key[:n], dtype=np.int64) == wanted[:n]
            common = n if same.all() else int(np.argmin(same))
            usable = common // self.chunk * self.chunk
            if usable > best:
                best, found = usable, key
        if found is None:
            return 0, None
        self.entries.move_to_end(found)
        return best, self.entries[found]

    def wants(self, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` are worth storing (0: none, or already covered)."""
        length = (len(ids) - 1) // self.chunk * self.chunk  # whole chunks, not the prompt's last token
        if length == 0 or self.budget <= 0:
            return 0
        key = tuple(ids[:length])
        for cached in self.entries:
            if len(cached) >= length and cached[:length] == key:
                return 0
        return length

    def store(self, ids: list[int], arrays: list[np.ndarray]) -> None:
        size = sum(a.nbytes for a in arrays)
        if size > self.budget:
            return
        self.entries[tuple(ids)] = arrays
        self.bytes += size
        while self.bytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= sum(a.nbytes for a in old)


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

    @property
    def decoding(self) -> bool:
        return self.filled >= len(self.seq.prompt)

    @property
    def position(self) -> int:
        """Tokens in the KV cache (the next one goes here)."""
        return len(self.seq.prompt) + max(len(self.seq.tokens) - 1, 0)


class GenerationScheduler:
    """A language model served to many concurrent requests (see the module docstring)."""

    def __init__(self, model: Any, *, slots: int | None = None, queue: int | None = None,
                 prefill_chunk: int | None = None, prefix_cache_bytes: int | None = None,
                 stats: GenerationStats | None = None):  # fmt: skip
        gen = model.gen
        self.model = model
        self.slots = slots or gen.slots
        self.max_queue = gen.queue if queue is None else queue
        self.chunk = prefill_chunk or gen.prefill_chunk
        budget = gen.prefix_cache_mib * 2**20 if prefix_cache_bytes is None else prefix_cache_bytes
        self.cache = PrefixCache(budget, self.chunk)
        self.stats = stats or GenerationStats(model.name, model.version)
        self.session = model.open_session(slots=max(self.slots, MIN_ROWS))
        self.active: list[Ticket | None] = [None] * self.slots
        self.waiting: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._closing = self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"generate-{model.name}", daemon=True)
        self._thread.start()

    # -- called from other threads -------------------------------------------------------------

    def submit(self, seq: Sequence, emit: Emit) -> Ticket:
        """Queue a request; Overloaded when the queue is full."""
        ticket = Ticket(seq, emit)
        with self._cond:
            if self._closing:
                raise SchedulerClosed(f"model '{self.model.name}' is shutting down")
            if len(self.waiting) >= self.max_queue and None not in self.active:
                raise Overloaded(f"model '{self.model.name}': all {self.slots} slots busy and {len(self.waiting)} "
                                 "requests waiting; retry later", retry_after=1.0)  # fmt: skip
            self.waiting.append(ticket)
            self.stats.queued = len(self.waiting)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request (its client left); its slot is free before the next decode step."""
        with self._cond:
            ticket.cancelled = True
            if ticket in self.waiting:
                self.waiting.remove(ticket)
                self.stats.queued = len(self.waiting)
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new requests, let queued and running ones finish for up to ``timeout`` seconds, then end
        the rest with an error and stop the thread."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            while (self.waiting or self.running) and time.monotonic() < deadline:
                self._cond.wait(min(0.05, max(deadline - time.monotonic(), 0)))
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)

    @property
    def running(self) -> int:
        return sum(t is not None for t in self.active)

    # -- the scheduler thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled()
                while not self._closed and not self.waiting and self.running == 0:
                    self._cond.wait()
                if self._closed:
                    self._fail_all(SchedulerClosed(f"model '{self.model.name}' is shutting down"))
                    return
                admitted = self._admit()
            try:
                for ticket in admitted:
                    self._reuse_prefix(ticket)
                self._decode_step()
                self._prefill_step()
            except Exception as exc:  # a failed forward pass fails the requests in it, not the server
                log.exception("generation step failed")
                with self._cond:
                    for slot, ticket in enumerate(self.active):
                        if ticket is not None:
                            self._finish(slot, exc)

    def _admit(self) -> list[Ticket]:
        admitted = []
        while self.waiting and None in self.active:
            ticket = self.waiting.popleft()
            ticket.slot = self.active.index(None)
            self.active[ticket.slot] = ticket
            admitted.append(ticket)
            self.stats.queue_time.observe(time.perf_counter() - ticket.queued_at)
        self.stats.queued, self.stats.active = len(self.waiting), self.running
        return admitted

    def _drop_cancelled(self) -> None:
        for slot, ticket in enumerate(self.active):
            if ticket is not None and ticket.cancelled:
                self.active[slot] = None
                self.stats.cancelled += 1
                self._cond.notify_all()
        self.stats.active = self.running

    def _fail_all(self, exc: Exception) -> None:
        for ticket in [*self.waiting, *(t for t in self.active if t is not None)]:
            ticket.emit(exc)
        self.waiting.clear()
        self.active = [None] * self.slots

    def _finish(self, slot: int, error: Exception | None = None) -> None:
        ticket = self.active[slot]
        assert ticket is not None
        self.active[slot] = None
        self.stats.active = self.running
        self._cond.notify_all()  # close() may be waiting for the last one
        if error is not None:
            ticket.emit(error)
            return
        result = ticket.seq.result()
        self.stats.finished(result)
        ticket.emit(result)

    def _reuse_prefix(self, ticket: Ticket) -> None:
        prompt = ticket.seq.prompt
        self.stats.prompt_tokens += len(prompt)
        length, arrays = self.cache.lookup(prompt)
        if arrays is not None:
            self.session.write_prefix(ticket.slot, arrays, length)
            ticket.filled = ticket.seq.cached_tokens = length
            self.stats.prefix_hits += 1
            self.stats.prefix_saved_tokens += length
        else:
            self.stats.prefix_misses += 1

    def _decode_step(self) -> None:
        rows = [i for i, t in enumerate(self.active) if t is not None and t.decoding and not t.cancelled]
        if not rows:
            return
        n = max(rows[-1] + 1, MIN_ROWS)
        tokens, positions = [0] * n, [0] * n
        for i in range(min(n, self.slots)):
            ticket = self.active[i]
            if ticket is None or ticket.cancelled:
                continue
            if ticket.decoding:
                tokens[i], positions[i] = ticket.seq.tokens[-1], ticket.position
            else:
                positions[i] = ticket.filled  # a dummy: the next prompt chunk starts here and overwrites it
        started = time.perf_counter()
        logits = self.session.decode(tokens, positions, logit_rows=rows[-1] + 1)
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(rows)
        self.stats.step_time.observe(time.perf_counter() - started)
        for i in rows:
            self._advance(i, logits[i])

    def _prefill_step(self) -> None:
        pending = [t for t in self.active if t is not None and not t.decoding and not t.cancelled]
        if not pending:
            return
        ticket = min(pending, key=lambda t: t.queued_at)
        prompt = ticket.seq.prompt
        end = min((ticket.filled // self.chunk + 1) * self.chunk, len(prompt))
        logits = self.session.prefill(ticket.slot, prompt[ticket.filled : end], ticket.filled)
        ticket.filled = end
        if not ticket.decoding:
            return
        length = self.cache.wants(prompt)
        if length:
            self.cache.store(prompt[:length], self.session.read_prefix(ticket.slot, length))
            self.stats.prefix_cache_bytes = self.cache.bytes
        self._advance(ticket.slot, logits)

    def _advance(self, slot: int, logits: np.ndarray) -> None:
        ticket = self.active[slot]
        assert ticket is not None
        now = time.perf_counter()
        piece = ticket.seq.advance(logits)
        if ticket.last_token_at == 0.0:
            self.stats.ttft.observe(now - ticket.queued_at)
        else:
            self.stats.itl.observe(now - ticket.last_token_at)
        ticket.last_token_at = now
        self.stats.token(now)
        if piece:
            ticket.emit(piece)
        if ticket.seq.finish_reason:
            with self._cond:
                self._finish(slot)


def warm_up(scheduler: GenerationScheduler) -> None:
    """One short greedy request through the scheduler, so the first client does not pay for first-call setup."""
    done = threading.Event()
    seq = scheduler.model.prepare(prompt="Hello", max_tokens=2, temperature=0)
    scheduler.submit(seq, lambda item: done.set() if not isinstance(item, str) else None)
    done.wait(60)


class AsyncGeneration:
    """A submitted request as an async iterator of text pieces ending with its Generation.

    Leaving the iteration early (the client disconnected, the task was cancelled) cancels the
    request in the scheduler, which frees its slot.
    """

    def __init__(self, scheduler: GenerationScheduler, seq: Sequence):
        self.scheduler = scheduler
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.ticket = scheduler.submit(seq, lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item))
        self.done = False

    async def __aiter__(self) -> AsyncIterator[str | Generation]:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    self.done = True
                    raise item
                if isinstance(item, Generation):
                    self.done = True
                yield item
                if self.done:
                    return
        finally:
            if not self.done:
                self.scheduler.cancel(self.ticket)

    async def result(self) -> Generation:
        """Wait for the whole generation."""
        async for item in self:
            if isinstance(item, Generation):
                return item
        raise RuntimeError("generation ended without a result")
