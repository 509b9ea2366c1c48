"""Response cache keys and LRU bounds; the event-loop batcher merging, splitting and isolating errors."""

import asyncio

import numpy as np
import pytest

from forwardpass.errors import InvalidInput, Overloaded, RequestTimeout
from forwardpass.scheduler import DynamicBatcher, Policy, ResponseCache, cache_key

X = np.arange(6, dtype=np.float32)


def key(**kw):
    args = {"model": "m", "version": 1, "inputs": [("x", "FP32", [2, 3], X.tobytes())], "parameters": {}, "outputs": []}
    args.update(kw)
    return cache_key(args["model"], args["version"], args["inputs"], args["parameters"], args["outputs"])


def test_key_covers_every_field():
    base = key()
    assert key() == base
    variants = [
        key(model="n"), key(version=2), key(inputs=[("y", "FP32", [2, 3], X.tobytes())]),
        key(inputs=[("x", "FP32", [3, 2], X.tobytes())]),  # same bytes, other shape: Triton's key collides here
        key(inputs=[("x", "INT32", [2, 3], X.tobytes())]),  # same bytes, other datatype
        key(inputs=[("x", "FP32", [2, 3], (X + 1).tobytes())]),
        key(parameters={"top_k": 2}), key(outputs=[{"name": "probabilities"}]),
    ]  # fmt: skip
    assert len({base, *variants}) == len(variants) + 1
    assert key(parameters={"a": 1, "b": 2}) == key(parameters={"b": 2, "a": 1})


def test_lru_bounded_in_bytes():
    cache = ResponseCache(max_bytes=3 * (32 + 64 + 400))
    for i in range(3):
        cache.put(bytes([i]) * 32, {"y": np.zeros(100, np.float32)})
    assert len(cache) == 3
    assert cache.get(bytes([0]) * 32) is not None  # 0 is now most recent
    cache.put(bytes([3]) * 32, {"y": np.zeros(100, np.float32)})
    assert cache.get(bytes([1]) * 32) is None  # the least recently used went
    assert cache.get(bytes([0]) * 32) is not None and cache.bytes <= cache.max_bytes
    cache.put(b"big" * 11, {"y": np.zeros(10_000, np.float32)})  # larger than the whole cache: not stored
    assert cache.get(b"big" * 11) is None


def test_cached_arrays_are_copies():
    cache = ResponseCache(10_000)
    batch = np.zeros((4, 2), np.float32)
    cache.put(b"k" * 32, {"y": batch[1:2]})
    batch[1] = 7
    assert cache.get(b"k" * 32)["y"].base is None and cache.get(b"k" * 32)["y"].sum() == 0


class Recorder:
    """A fake forward pass: y = 2x, recording each batch; fails on negative values."""

    def __init__(self):
        self.batches = []

    def __call__(self, feeds):
        x = feeds["x"]
        self.batches.append(len(x))
        if (x < 0).any():
            raise InvalidInput(("inputs", "x"), "negative")
        return {"y": x * 2}


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_merge_and_split_in_order():
    rec = Recorder()

    async def main():
        b = DynamicBatcher(rec, Policy(max_batch_size=8, max_queue_delay=0.05), inline=True)
        xs = [np.full((i % 3 + 1, 2), i, np.float32) for i in range(5)]
        results = await asyncio.gather(*(b.submit({"x": x}, len(x), ("x", (2,))) for x in xs))
        for x, (out, queued, compute) in zip(xs, results):
            np.testing.assert_array_equal(out["y"], x * 2)
            assert queued >= 0 and compute >= 0
        await b.drain()

    run(main())
    assert sum(rec.batches) == 1 + 2 + 3 + 1 + 2 and max(rec.batches) <= 8 and len(rec.batches) <= 2


def test_one_bad_request_does_not_fail_its_batch_mates():
    rec = Recorder()

    async def main():
        b = DynamicBatcher(rec, Policy(max_batch_size=8, max_queue_delay=0.05), inline=True)
        xs = [np.ones((1, 2), np.float32), -np.ones((1, 2), np.float32), np.ones((1, 2), np.float32) * 3]
        results = await asyncio.gather(*(b.submit({"x": x}, 1, "s") for x in xs), return_exceptions=True)
        assert isinstance(results[1], InvalidInput)
        np.testing.assert_array_equal(results[2][0]["y"], xs[2] * 2)
        await b.drain()

    run(main())
    assert rec.batches[0] == 3 and rec.batches[1:] == [1, 1, 1]


def test_queue_full_and_timeout():
    import time
    from concurrent.futures import ThreadPoolExecutor

    def slow(feeds):
        time.sleep(0.2)
        return {"y": feeds["x"]}

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher(slow, Policy(max_batch_size=1), inline=False, executor=pool, max_queue_size=1)
            now = time.monotonic()
            running = asyncio.create_task(b.submit({"x": X[:1]}, 1, "s"))
            await asyncio.sleep(0.01)  # the worker has taken it: the instance is busy for 0.2 s
            waiting = asyncio.create_task(b.submit({"x": X[:1]}, 1, "s", deadline=now + 0.05))
            await asyncio.sleep(0)
            with pytest.raises(Overloaded):
                await b.submit({"x": X[:1]}, 1, "s")
            with pytest.raises(RequestTimeout):
                await waiting
            assert (await running)[0]["y"].shape == (1,)
            await b.drain()

    run(main())


def test_thread_pool_instances_run_concurrently():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    active, peak = [0], [0]
    lock = threading.Lock()

    def work(feeds):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return {"y": feeds["x"]}

    async def main():
        with ThreadPoolExecutor(2) as pool:
            b = DynamicBatcher(work, Policy(max_batch_size=1), instances=2, inline=False, executor=pool)
            await asyncio.gather(*(b.submit({"x": X[:1]}, 1, i) for i in range(4)))
            await b.drain()

    run(main())
    assert peak[0] == 2
