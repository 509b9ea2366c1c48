"""The dynamic batcher on the event loop: queue requests, plan batches, run them on instances.

    batcher = DynamicBatcher(run, Policy(max_batch_size=64), inline=True)
    outputs, queue_s, compute_s = await batcher.submit({"input": x}, rows=1, signature=sig)

``run(feeds) -> {output: array}`` is the blocking forward pass over a merged batch. Tiny
models run ``inline`` on the loop (a thread hop costs more than their forward pass; while
one runs, arriving requests queue up and form the next batch); others run on a thread pool,
``instances`` at a time (ONNX Runtime releases the GIL).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor

import numpy as np

from forwardpass.errors import BatcherClosed, ModelNotReady, Overloaded, RequestTimeout
from forwardpass.scheduler.batcher import Pending, Policy, plan

Outputs = dict[str, np.ndarray]
Result = tuple[Outputs, float, float]  # outputs for this request's rows, seconds queued, seconds computing


class DynamicBatcher:
    """One model version's queue and its instances."""

    def __init__(
        self,
        run: Callable[[dict[str, np.ndarray]], Outputs],
        policy: Policy,
        *,
        instances: int = 1,
        inline: bool = True,
        max_queue_size: int = 1024,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[int, float], None] | None = None,
        crowded: Callable[[], bool] = lambda: False,
        settle: bool = True,
    ):
        if not inline and executor is None:
            raise ValueError("a batcher that does not run inline needs an executor")
        self._run, self.policy, self.instances, self.inline = run, policy, instances, inline
        self._max_queue, self._executor, self._clock, self._on_batch = max_queue_size, executor, clock, on_batch
        self._queue: list[Pending] = []
        self._wake: asyncio.Event | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._idle = instances
        self._closing = False
        # A request alone in the server runs on its own coroutine, with no hand-over to a worker.
        # If others are in flight (``crowded``) it queues instead, so the worker runs them all as
        # one batch. With ``settle`` it first yields once, for servers whose count of requests in
        # flight lags (ASGI: requests that arrived together start one after another); forwardpass's
        # own HTTP protocol counts a request as soon as its bytes are parsed and needs no yield.
        self._direct = inline and policy.max_queue_delay <= 0
        self._crowded, self._settle = crowded, settle

    @property
    def queued(self) -> int:
        """Requests waiting (not yet running)."""
        return len(self._queue)

    async def submit(
        self, feeds: dict[str, np.ndarray], rows: int, signature: Hashable | None = None, deadline: float | None = None
    ) -> Result:
        """Queue one request (``rows`` rows) and wait for its outputs.

        Requests merge when their ``signature`` is equal; None means the feeds' input names,
        datatypes and non-batch shapes.
        """
        if self._closing:
            raise BatcherClosed("the model version is being unloaded; retry to reach the current version")
        if self._settle and self._direct and self._idle == self.instances and not self._queue:
            await asyncio.sleep(0)
        if self._direct and self._idle == self.instances and not self._queue and not self._crowded():
            self._idle -= 1
            try:
                start = self._clock()
                outputs = self._run(feeds)
                compute = self._clock() - start
            finally:
                self._idle += 1
            if self._queue:  # requests that arrived meanwhile are waiting for a worker
                self._wakeup()
            if self._on_batch is not None:
                self._on_batch(rows, compute)
            return outputs, 0.0, compute
        if len(self._queue) >= self._max_queue:
            raise Overloaded(f"queue full ({self._max_queue} requests waiting); retry shortly", retry_after=1.0)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        if signature is None:
            signature = tuple((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items())
        pending = Pending(rows, signature, self._clock(), deadline, (feeds, future))
        self._queue.append(pending)
        if deadline is not None:  # expires in the queue even while every instance is busy with a long pass
            timer = asyncio.get_running_loop().call_later(max(0.0, deadline - self._clock()), self._expire, pending)
            future.add_done_callback(lambda _: timer.cancel())
        self._wakeup()
        return await future

    def _expire(self, pending: Pending) -> None:
        """A queued request's deadline passed before a worker took it: 504 now, not when a worker frees up."""
        for i, queued in enumerate(self._queue):  # by identity: equal-looking requests may wait beside it
            if queued is pending:
                del self._queue[i]
                break
        else:
            return  # taken into a batch already: it runs to the end
        _fail(pending, RequestTimeout(f"request waited {self._clock() - pending.enqueued:.3f} s in the queue, "
                                      "past its deadline"))  # fmt: skip

    def _wakeup(self) -> None:
        if not self._workers:
            self._wake = asyncio.Event()
            self._workers = [asyncio.create_task(self._worker()) for _ in range(self.instances)]
        assert self._wake is not None
        self._wake.set()

    async def drain(self, timeout: float = 30.0) -> None:
        """Stop taking requests, finish the queued ones, stop the workers."""
        self._closing = True
        if not self._workers:
            return
        assert self._wake is not None
        self._wake.set()
        done, pending = await asyncio.wait(self._workers, timeout=timeout)
        for task in pending:
            task.cancel()
        for item in self._queue:
            _fail(item, ModelNotReady("the server stopped before this request ran"))
        self._queue.clear()

    async def _worker(self) -> None:
        assert self._wake is not None
        while True:
            now = self._clock()
            decision = plan(self._queue, now, self.policy)
            gone = set(decision.expired) | set(decision.take)
            for i in decision.expired:
                _fail(self._queue[i], RequestTimeout(f"request waited {now - self._queue[i].enqueued:.3f} s in "
                                                     "the queue, past its deadline"))  # fmt: skip
            batch = [self._queue[i] for i in decision.take]
            if gone:
                self._queue = [p for i, p in enumerate(self._queue) if i not in gone]
            batch = [p for p in batch if not p.payload[1].done()]  # callers that went away
            if batch:
                self._idle -= 1
                try:
                    await self._execute(batch, now)
                finally:
                    self._idle += 1
                continue
            if self._closing and not self._queue:
                return
            self._wake.clear()
            timeout = None if decision.wake_at is None else max(0.0, decision.wake_at - self._clock())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _execute(self, batch: list[Pending], now: float) -> None:
        names = batch[0].payload[0].keys()
        if len(batch) == 1:
            feeds = batch[0].payload[0]
        else:
            feeds = {n: np.concatenate([p.payload[0][n] for p in batch]) for n in names}
        start = self._clock()
        try:
            outputs = await self._call(feeds)
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            # one bad request (NaN caught in the graph, an index out of range) fails the merged
            # batch: run each alone so only the bad one gets the error
            for item in batch:
                await self._execute([item], now)
            return
        compute = self._clock() - start
        if self._on_batch is not None:
            self._on_batch(sum(p.rows for p in batch), compute)
        offset = 0
        for item in batch:
            end = offset + item.rows
            part = outputs if len(batch) == 1 else {k: v[offset:end] for k, v in outputs.items()}
            future = item.payload[1]
            if not future.done():
                future.set_result((part, start - item.enqueued, compute))
            offset = end

    async def _call(self, feeds: dict[str, np.ndarray]) -> Outputs:
        if self.inline:
            return self._run(feeds)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, feeds)


def _fail(item: Pending, exc: BaseException) -> None:
    future = item.payload[1]
    if not future.done():
        future.set_exception(exc)


__all__ = ["DynamicBatcher", "Policy"]
