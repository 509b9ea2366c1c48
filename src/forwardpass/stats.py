"""Serving statistics, counted on the hot path with plain arithmetic (well under a microsecond).

One ModelStats per model version; ``Stats`` holds them all. server/metrics.py formats them as
Prometheus text when /metrics is scraped, and as Triton's statistics extension for /v2/.../stats.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from typing import Any

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """Counts per bucket (upper bounds), sum and count; observe() is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts):
            total += n
            out.append((bound, total))
        return out


class ModelStats:
    """What one model version has done: requests by status, latencies, batches, cache."""

    def __init__(self, name: str, version: int):
        self.name, self.version = name, version
        self.by_status: dict[int, int] = {}
        self.success_count = self.fail_count = 0
        self.success_ns = self.fail_ns = self.queue_ns = self.compute_ns = 0
        self.inference_count = self.execution_count = 0  # rows inferred, batches run
        self.cache_hits = self.cache_misses = 0
        self.cache_hit_ns = 0
        self.last_inference_ms = 0
        self.sequences: Any = None  # a stateful model's Sequences (engine/sequences.py): .live counts them
        self.drift: Any = None  # the version's DriftMonitor (monitoring/drift.py), when it has a reference
        self.total = Histogram(LATENCY_BUCKETS)
        self.queue = Histogram(LATENCY_BUCKETS)
        self.compute = Histogram(LATENCY_BUCKETS)
        self.batch_rows = Histogram(BATCH_BUCKETS)

    def request(self, status: int, total_s: float, queue_s: float = 0.0, rows: int = 0, cached: bool = False) -> None:
        """Record one finished request."""
        self.by_status[status] = self.by_status.get(status, 0) + 1
        ns = int(total_s * 1e9)
        if status == 200:
            self.success_count += 1
            self.success_ns += ns
            self.inference_count += rows
            self.queue_ns += int(queue_s * 1e9)
            self.last_inference_ms = int(time.time() * 1000)
            if cached:
                self.cache_hit_ns += ns
            self.queue.observe(queue_s)
        else:
            self.fail_count += 1
            self.fail_ns += ns
        self.total.observe(total_s)

    def batch(self, rows: int, compute_s: float) -> None:
        """Record one forward pass over a merged batch."""
        self.execution_count += 1
        self.compute_ns += int(compute_s * 1e9)
        self.compute.observe(compute_s)
        self.batch_rows.observe(rows)

    def v2(self) -> dict[str, Any]:
        """Triton's statistics-extension shape for this version."""

        def duration(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}

        return {
            "name": self.name,
            "version": str(self.version),
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": duration(self.success_count, self.success_ns),
                "fail": duration(self.fail_count, self.fail_ns),
                "queue": duration(self.success_count, self.queue_ns),
                "compute_input": duration(self.execution_count, 0),
                "compute_infer": duration(self.execution_count, self.compute_ns),
                "compute_output": duration(self.execution_count, 0),
                "cache_hit": duration(self.cache_hits, self.cache_hit_ns),
                "cache_miss": duration(self.cache_misses, 0),
            },
            "batch_stats": [],
        }


class GenerationStats:
    """A served language model: tokens, latencies per token, queue, slots, prefix cache."""

    RATE_WINDOW = 10.0  # seconds over which tokens_per_second is measured

    def __init__(self, name: str, version: int):
        self.name, self.version = name, version
        self.queued = self.active = 0  # gauges
        self.prompt_tokens = self.generated_tokens = 0
        self.finish_reasons: dict[str, int] = {}
        self.cancelled = 0
        self.prefix_hits = self.prefix_misses = self.prefix_saved_tokens = self.prefix_cache_bytes = 0
        self.decode_steps = self.decode_rows = 0
        self.ttft = Histogram(LATENCY_BUCKETS)  # request queued -> first token
        self.itl = Histogram(LATENCY_BUCKETS)  # between tokens of one request
        self.queue_time = Histogram(LATENCY_BUCKETS)  # waiting for a slot
        self.step_time = Histogram(LATENCY_BUCKETS)  # one batched decode call
        self._recent: deque[float] = deque(maxlen=65536)  # token times, for tokens_per_second

    def token(self, now: float) -> None:
        self.generated_tokens += 1
        self._recent.append(now)

    def finished(self, result: Any) -> None:
        self.finish_reasons[result.finish_reason] = self.finish_reasons.get(result.finish_reason, 0) + 1

    def tokens_per_second(self, now: float | None = None) -> float:
        """Tokens generated per second over the last RATE_WINDOW seconds (all requests together)."""
        now = time.perf_counter() if now is None else now
        recent = self._recent
        while recent and recent[0] < now - self.RATE_WINDOW:
            recent.popleft()
        return len(recent) / self.RATE_WINDOW


class Stats:
    """Every ModelStats of a server, the language models' GenerationStats, and the in-flight gauge."""

    def __init__(self) -> None:
        self.models: dict[tuple[str, int], ModelStats] = {}
        self.generation: dict[tuple[str, int], GenerationStats] = {}
        self.inflight = 0
        # unexpected errors (500s) outside a V2 model's own statistics: language models, other routes
        self.unexpected_errors: dict[tuple[str, str], int] = {}

    def unexpected(self, model: str = "", version: str = "") -> None:
        """Count one unexpected error (a 500) for a model ("" when no model is known)."""
        key = (model, version)
        self.unexpected_errors[key] = self.unexpected_errors.get(key, 0) + 1

    def generation_stats(self, name: str, version: int) -> GenerationStats:
        key = (name, version)
        found = self.generation.get(key)
        if found is None:
            found = self.generation[key] = GenerationStats(name, version)
        return found

    def stats(self, name: str, version: int) -> ModelStats:
        """The stats object for a model version (kept across reloads of that version)."""
        key = (name, version)
        found = self.models.get(key)
        if found is None:
            found = self.models[key] = ModelStats(name, version)
        return found
