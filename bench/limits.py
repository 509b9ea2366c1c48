"""What a rate-limit check and the whole tenancy cost per request, in this process.

    python bench/limits.py [--rounds 5] [--n 20000]

1. One token-bucket take shared across processes, two ways (issue 19 asked to measure both):
   forwardpass's mapped file with flock (monitoring/limits.py) against SQLite in WAL mode (one
   UPDATE transaction per check, synchronous=NORMAL), and the same buckets from 2 processes at once.
3. Drift: what serving pays per batch (``DriftMonitor.observe``, a queue put) and how many rows a second
   the profiler thread takes in (the target: >= 100k rows/s), for 64-row batches of 30 features.
2. The tenancy on the request path, as App.dispatch runs it for an inference request: the key check
   (SHA-256 of the secret, lookup), the quota and request-rate check, rows taken, x-ratelimit-*
   headers, usage recorded; against the same request with keys off and metering off.

Medians of interleaved rounds, microseconds per request. The target (issue 19): <= 50 us added per request.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine import cpu_flags  # noqa: E402

from forwardpass.monitoring.keys import Caller, Tier, Tiers, create_key  # noqa: E402
from forwardpass.monitoring.limits import Limiter, SharedBuckets  # noqa: E402

TIER = Tier(requests_per_second=1e9, burst=10**9, rows_per_minute=10**12)  # never refuses: the cost of checking


def mapped(path: Path, n: int) -> float:
    limiter = Limiter(SharedBuckets(path))
    who = Caller("bench", TIER, False, "bench")
    start = time.perf_counter()
    for _ in range(n):
        limiter.admit(who)
    return (time.perf_counter() - start) / n * 1e6


def sqlite_wal(path: Path, n: int) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, level REAL, stamp REAL)")
    db.execute("INSERT OR IGNORE INTO buckets VALUES ('bench', 1e18, 0)")
    start = time.perf_counter()
    for _ in range(n):
        now = time.monotonic()
        db.execute("BEGIN IMMEDIATE")
        (level, stamp), = db.execute("SELECT level, stamp FROM buckets WHERE key = 'bench'").fetchall()
        level = min(1e18, level + (now - stamp) * 1e9)
        db.execute("UPDATE buckets SET level = ?, stamp = ? WHERE key = 'bench'", (level - 1, now))
        db.execute("COMMIT")
    took = (time.perf_counter() - start) / n * 1e6
    db.close()
    return took


def _worker(kind: str, path: str, n: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    out.put((mapped if kind == "mapped" else sqlite_wal)(Path(path), n))


def two_processes(kind: str, path: Path, n: int) -> float:
    """Both processes checking the same key at once: the mean us per check each saw."""
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    procs = [context.Process(target=_worker, args=(kind, str(path), n, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return statistics.mean(out.get() for _ in procs)


def drift(n: int) -> tuple[float, float]:
    """(us per observe on the serving thread, rows/s the profiler records)."""
    import numpy as np

    from forwardpass.monitoring.drift import PROFILER, DriftMonitor, Reference

    rng = np.random.default_rng(0)
    names = [f"f{i}" for i in range(30)]
    reference = Reference.build(rng.normal(size=(2000, 30)), names, classes=rng.integers(0, 2, 2000), n_classes=2)
    monitor = DriftMonitor(reference, "input", None, "probabilities", "classification")
    batch = {"input": rng.normal(size=(64, 30)).astype(np.float32)}
    outputs = {"probabilities": rng.random((64, 2)).astype(np.float32)}
    batches = max(1, n // 20)
    start = time.perf_counter()
    for _ in range(batches):
        monitor.record(batch["input"], outputs["probabilities"])
    rate = batches * 64 / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(batches):
        monitor.observe(batch, outputs)
    observe_us = (time.perf_counter() - start) / batches * 1e6
    PROFILER.wait()
    return observe_us, rate


def tenants(root: Path) -> tuple[Path, Path, str]:
    """keys.yaml with one key of a tier whose limits never refuse (so every check runs in full), tiers.yaml."""
    keys_file, tiers_file = root / "keys.yaml", root / "tiers.yaml"
    tiers_file.write_text("tiers:\n  bench: {requests_per_second: 1.0e9, burst: 1000000000, "
                          "rows_per_minute: 1000000000000, monthly_requests: 1000000000000}\n")  # fmt: skip
    secret, _ = create_key(keys_file, "bench", key_id="bench", tiers=Tiers.load(tiers_file))
    return keys_file, tiers_file, secret


def request_path(root: Path, setup: tuple[Path, Path, str], n: int, tenancy_on: bool) -> float:
    """us per request of what the tenancy adds to an inference request (App.dispatch's steps, no model)."""
    from forwardpass.server.auth import Access, Keys
    from forwardpass.server.config import ServeConfig
    from forwardpass.server.http import Request, Response
    from forwardpass.server.tenancy import tenancy_from_config

    keys_file, tiers_file, secret = setup
    config = ServeConfig(keys_file=keys_file if tenancy_on else None, tiers_file=tiers_file, state_dir=root / "state",
                         metering=tenancy_on, usage_flush_interval=1.0)  # fmt: skip
    tenancy = tenancy_from_config(config)
    keys = Keys.from_config(config, tenancy)
    scope = {"type": "http", "method": "POST", "path": "/v2/models/digits/infer", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {secret}".encode())]}  # fmt: skip
    response = Response(200, b"{}")
    start = time.perf_counter()
    for _ in range(n):
        request = Request(scope, None, {"model": "digits"}, b"{}")
        caller = keys.check(request, Access.INFER)
        if caller is not None:
            tenancy.admit(request, caller, True, "digits")
            tenancy.rows(request, "digits", 1)
        if request.charge is not None:
            response.headers = []
            tenancy.finish(request, response)
    took = (time.perf_counter() - start) / n * 1e6
    tenancy.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20000, help="checks per point")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fp-limits-"))
    setup = tenants(root)
    rows: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        SharedBuckets.reset(root / "limits.bin")
        rows.setdefault("mapped file + flock, 1 process", []).append(mapped(root / "limits.bin", args.n))
        rows.setdefault("SQLite WAL transaction, 1 process", []).append(sqlite_wal(root / "buckets.sqlite", args.n // 4))
        rows.setdefault("mapped file + flock, 2 processes at once", []).append(
            two_processes("mapped", root / "limits.bin", args.n))
        rows.setdefault("SQLite WAL transaction, 2 processes at once", []).append(
            two_processes("sqlite", root / "buckets.sqlite", args.n // 4))
        off = request_path(root, setup, args.n, tenancy_on=False)
        on = request_path(root, setup, args.n, tenancy_on=True)
        rows.setdefault("request path, keys and metering off", []).append(off)
        rows.setdefault("request path, key + quota + rate + rows + metering", []).append(on)
        rows.setdefault("added per request by the tenancy", []).append(on - off)
        observe_us, rate = drift(args.n)
        rows.setdefault("drift: observe a served batch (serving thread)", []).append(observe_us)
        rows.setdefault("drift: profiler rows per second (thousands)", []).append(rate / 1000)
    print(f"CPU: {cpu_flags()}; medians of {args.rounds} interleaved rounds, us per check or request\n")
    for name, values in rows.items():
        print(f"{name:<52}{statistics.median(values):>9.2f} us   (rounds {[round(v, 2) for v in values]})")
    added = statistics.median(rows["added per request by the tenancy"])
    print(f"\ntarget <= 50 us added per request: {added:.1f} us -> {'met' if added <= 50 else 'MISSED'}")
    rate = statistics.median(rows["drift: profiler rows per second (thousands)"]) * 1000
    print(f"target >= 100k rows/s of drift updates: {rate / 1000:.0f}k -> {'met' if rate >= 100_000 else 'MISSED'}")


if __name__ == "__main__":
    main()
