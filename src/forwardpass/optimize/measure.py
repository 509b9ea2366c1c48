"""Measuring variants side by side: latency at batch 1 and 32, throughput, and quality on validation rows.

    timing = latency({"original": s0, "dynamic-int8": s1}, X, rounds=5)   # interleaved rounds
    quality = score(outputs, reference, y, task, labels)                  # accuracy / R², or agreement

Latency: each round times every variant in turn (a block of batch-1 runs, then of batch-32 runs), so a
machine that slows down part-way slows all of them alike; percentiles over every run of every round. A
block is 60 runs, or as many as fit in a quarter of a second for a slow model (at least 3).
Quality: accuracy (classification) or R² (regression) against the labels when there are labels, else
agreement with the original model's answers (same class; R² of the original's values). The drop against
the original comes with a 95% interval from a paired bootstrap over the validation rows (1000 resamples,
seeded): with few rows one different answer moves accuracy by whole points, and the interval says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BATCHES = (1, 32)
SEED = 0


@dataclass(frozen=True)
class Timing:
    p50_ms: dict[int, float]  # batch size -> median milliseconds per call
    p99_ms: dict[int, float]

    def throughput(self, batch: int = 32) -> float:
        """Rows per second at ``batch`` rows a call (from the median call)."""
        return batch / (self.p50_ms[batch] / 1000)


def latency(sessions: dict[str, Any], X: np.ndarray, rounds: int = 5, calls: int = 60, block_s: float = 0.25,
            done: Callable[[int], object] = lambda rounds: None) -> dict[str, Timing]:  # fmt: skip
    """Interleaved timing of each session's ``run(None, {input: rows})`` at batch 1 and 32; ``done(r)`` after
    each round r (and with 0 before the first). A block is ``calls`` runs, fewer for a model that takes
    longer (as many as fit in ``block_s``, at least 3): a CNN at batch 32 takes a second a call."""
    batches = {b: np.ascontiguousarray(np.resize(X, (b, *X.shape[1:])).astype(np.float32)) for b in BATCHES}
    samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in sessions}
    block: dict[str, dict[int, int]] = {name: {} for name in sessions}
    for variant, session in sessions.items():  # first-use setup out of the timings, then one timed call
        name = session.get_inputs()[0].name
        for b, rows in batches.items():
            session.run(None, {name: rows})
            start = time.perf_counter()
            session.run(None, {name: rows})
            block[variant][b] = int(min(calls, max(3, block_s // (time.perf_counter() - start))))
    done(0)
    for r in range(rounds):
        for variant, session in sessions.items():
            name = session.get_inputs()[0].name
            for b, rows in batches.items():
                feed = {name: rows}
                for _ in range(block[variant][b]):
                    start = time.perf_counter()
                    session.run(None, feed)
                    samples[variant][b].append((time.perf_counter() - start) * 1000)
        done(r + 1)
    return {v: Timing({b: float(np.median(s[b])) for b in BATCHES}, {b: float(np.percentile(s[b], 99)) for b in BATCHES})
            for v, s in samples.items()}  # fmt: skip


@dataclass(frozen=True)
class Quality:
    metric: str  # "accuracy", "R²", "agreement" (same class as the original) or "R² vs original"
    value: float
    drop: float  # original's value minus this one (0 for the original)
    low: float  # 95% interval of the drop
    high: float


def predictions(session: Any, X: np.ndarray, task: str) -> np.ndarray:
    """Class indices (argmax of the probabilities) or values, for every row, in batches of 256."""
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    out = []
    for i in range(0, len(X), 256):
        results = dict(zip(outputs, session.run(None, {name: X[i : i + 256].astype(np.float32)}), strict=True))
        if task == "classification":
            scores = results.get("probabilities", next(iter(results.values())))
            out.append(np.asarray(scores).reshape(len(X[i : i + 256]), -1).argmax(axis=1))
        else:
            out.append(np.asarray(next(iter(results.values()))).reshape(-1))
    return np.concatenate(out)


def _per_row(pred: np.ndarray, truth: np.ndarray, task: str) -> np.ndarray:
    """What the metric averages: correct (0/1) for classes, squared error for values."""
    return (pred == truth).astype(np.float64) if task == "classification" else (pred - truth) ** 2


def _metric(rows: np.ndarray, truth: np.ndarray, task: str) -> float:
    if task == "classification":
        return float(rows.mean())
    spread = float(((truth - truth.mean()) ** 2).mean()) or 1.0
    return 1.0 - float(rows.mean()) / spread  # R²


def score(pred: np.ndarray, original: np.ndarray, y: np.ndarray | None, task: str,
          labels: Sequence[str] = ()) -> Quality:  # fmt: skip
    """This variant's quality and its drop against the original (see the module docstring)."""
    if y is None:
        truth, name = original, ("agreement" if task == "classification" else "R² vs original")
    else:
        truth, name = y, ("accuracy" if task == "classification" else "R²")
        if task == "classification":
            truth = _class_indices(y, labels)
        truth = truth.astype(pred.dtype if task != "classification" else np.int64)
    mine, theirs = _per_row(pred, truth, task), _per_row(original, truth, task)
    value, base = _metric(mine, truth, task), _metric(theirs, truth, task)
    rng = np.random.default_rng(SEED)
    draws = rng.integers(0, len(truth), size=(1000, len(truth)))
    drops = [_metric(theirs[d], truth[d], task) - _metric(mine[d], truth[d], task) for d in draws]
    low, high = np.percentile(drops, [2.5, 97.5])
    return Quality(name, value, base - value, float(low), float(high))


def _class_indices(y: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Labels as the model's class indices: names through model.yaml's labels, or integers as they are."""
    if labels and not np.issubdtype(np.asarray(y).dtype, np.number):
        index = {str(label): i for i, label in enumerate(labels)}
        return np.array([index[str(v)] for v in y])
    return np.asarray(y).astype(np.int64)
