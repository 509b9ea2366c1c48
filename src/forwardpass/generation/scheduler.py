"""Continuous batching: many generation requests share one decoder, admitted between decode steps.

One thread owns the DecoderSession (``slots`` KV rows). Each turn of its loop is one step of
generation/steps.py: ``schedule(state)`` decides (admissions into free slots with their cached prompt
prefix, the rows to decode together in one ONNX Runtime call, the prompt chunk of the oldest
sequence still in its prompt, the cancelled requests to evict; see generation/schedule.py), ``execute``
runs that plan on the session and ``update`` samples the tokens and turns them into events.

A prefix-cache hit resumes the prompt at any cached length and computes exactly what a cold run computes
(chunks of two or more tokens are bit-identical however a prompt is cut: generation/schedule.py, MIN_CHUNK).
A cancelled request (client gone) leaves its slot at the next turn: within one decode step.
Results go back through each request's ``emit`` callback (text pieces, then a Generation or an
exception), called on this thread; AsyncGeneration turns them into an async iterator.

    scheduler = GenerationScheduler(llm, slots=8)
    ticket = scheduler.submit(llm.prepare(prompt="Hi", max_tokens=8), print)
    scheduler.close()
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from forwardpass.errors import Overloaded, SchedulerClosed
from forwardpass.generation.schedule import MIN_ROWS, Emit, PrefixCache, SchedulerState, Ticket
from forwardpass.generation.sequence import Generation, Sequence
from forwardpass.generation.steps import Event, Steps, fail_running
from forwardpass.stats import GenerationStats

__all__ = ["MIN_ROWS", "AsyncGeneration", "GenerationScheduler", "PrefixCache", "SchedulerClosed", "Ticket", "warm_up"]
log = logging.getLogger("forwardpass.generation")


class GenerationScheduler:
    """A language model served to many concurrent requests (see the module docstring)."""

    def __init__(self, model: Any, *, slots: int | None = None, queue: int | None = None,
                 prefill_chunk: int | None = None, prefix_cache_bytes: int | None = None,
                 stats: GenerationStats | None = None):  # fmt: skip
        gen = model.gen
        self.model = model
        self.slots = slots or gen.slots
        self.max_queue = gen.queue if queue is None else queue
        chunk = prefill_chunk or gen.prefill_chunk
        budget = gen.prefix_cache_mib * 2**20 if prefix_cache_bytes is None else prefix_cache_bytes
        self.session = model.open_session(slots=max(self.slots, MIN_ROWS))
        # a lone stream decodes alone where the graph computes a row the same alone as beside others
        min_rows = 1 if self.session.row_invariant else MIN_ROWS
        self.state = SchedulerState(self.slots, chunk, PrefixCache(budget), min_rows=min_rows,
                                    batch_prefill=self.session.row_invariant)  # fmt: skip
        self.stats = stats or GenerationStats(model.name, model.version)
        self._steps = Steps(self.session, self.state, self.stats)
        self._cond = threading.Condition()
        self._closing = self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"generate-{model.name}", daemon=True)
        self._thread.start()

    @property
    def cache(self) -> PrefixCache:
        return self.state.cache

    # -- called from other threads -------------------------------------------------------------

    def submit(self, seq: Sequence, emit: Emit, parent: Ticket | None = None) -> Ticket:
        """Queue a request (``parent``: the first choice of the same prompt, whose KV this one copies once it
        has read the prompt); Overloaded when the queue is full."""
        ticket = Ticket(seq, emit, parent=parent)
        waiting = self.state.waiting
        with self._cond:
            if self._closing:
                raise SchedulerClosed(f"model '{self.model.name}' is shutting down")
            if len(waiting) >= self.max_queue and None not in self.state.active:
                raise Overloaded(f"model '{self.model.name}': all {self.slots} slots busy and {len(waiting)} "
                                 "requests waiting; retry later", retry_after=1.0)  # fmt: skip
            waiting.append(ticket)
            self.stats.queued = len(waiting)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request (its client left); its slot is free before the next decode step."""
        with self._cond:
            ticket.cancelled = True
            if ticket in self.state.waiting:
                self.state.waiting.remove(ticket)
                self.stats.queued = len(self.state.waiting)
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new requests, let queued and running ones finish for up to ``timeout`` seconds, then end
        the rest with an error and stop the thread."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            while (self.state.waiting or self.running) and time.monotonic() < deadline:
                self._cond.wait(min(0.05, max(deadline - time.monotonic(), 0)))
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)

    @property
    def running(self) -> int:
        return self.state.running

    # -- the scheduler thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.state.waiting and self.running == 0:
                    self._cond.wait()
                if self._closed:
                    closed = SchedulerClosed(f"model '{self.model.name}' is shutting down")
                    events = [(t, closed) for t in self.state.waiting] + fail_running(self.state, self.stats, closed)
                    self.state.waiting.clear()
                    self._emit(events)
                    self._steps.close()
                    return
                plan = self._steps.plan()  # schedule + begin: under the lock, as submit and cancel change the queue
            try:
                # execute + update, without the lock: only this thread writes the slots (update frees finished
                # ones), submit and cancel only read them or touch the queue
                events = self._steps.carry_out(plan)
            except Exception as exc:  # a failed forward pass fails the requests in it, not the server
                log.exception("generation step failed")
                with self._cond:
                    events = fail_running(self.state, self.stats, exc)
            self._emit(events)

    def _emit(self, events: list[Event]) -> None:
        if any(not isinstance(item, str) for _, item in events):
            with self._cond:
                self._cond.notify_all()  # close() may be waiting for the last one
        for ticket, item in events:
            if ticket.cancelled:  # its client is gone (an asyncio loop may be closed): nobody to tell
                continue
            try:
                ticket.emit(item)
            except Exception:  # one request's broken callback must not stop the others
                log.exception("a generation request's emit callback failed; cancelling the request")
                self.cancel(ticket)


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

    def __init__(self, scheduler: GenerationScheduler, seq: Sequence, parent: AsyncGeneration | None = None):
        self.scheduler = scheduler
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.ticket: Ticket = scheduler.submit(seq, lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item),
                                               parent.ticket if parent is not None else None)  # fmt: skip
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

    def cancel(self) -> None:
        """Stop the request (its slot is freed before the next decode step)."""
        if not self.done:
            self.done = True
            self.scheduler.cancel(self.ticket)

    async def result(self) -> Generation:
        """Wait for the whole generation."""
        async for item in self:
            if isinstance(item, Generation):
                return item
        raise RuntimeError("generation ended without a result")
