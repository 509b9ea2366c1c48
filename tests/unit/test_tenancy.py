"""Keys with tiers, token buckets, metering: the logic, with an injected clock where time is the point."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
from pathlib import Path

import pytest
import yaml

from forwardpass.errors import PayloadTooLarge, RateLimited, SettingsFileError, Unauthorized
from forwardpass.monitoring.keys import Caller, KeyRegistry, Tier, Tiers, create_key, digest, read_keys, revoke_key
from forwardpass.monitoring.limits import Limiter, SharedBuckets, duration
from forwardpass.monitoring.usage import Meter, next_month, read_usage, totals


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def caller(**limits: object) -> Caller:
    return Caller("k1", Tier(**limits), False, "test")  # type: ignore[arg-type]


@pytest.fixture
def limiter(tmp_path: Path) -> tuple[Limiter, Clock]:
    clock = Clock()
    return Limiter(SharedBuckets(tmp_path / "limits.bin"), clock), clock


def header(headers: list[tuple[bytes, bytes]], name: str) -> str:
    return dict(headers)[name.encode()].decode()


def test_a_request_bucket_allows_its_burst_then_says_exactly_when_the_next_fits(limiter):
    limits, clock = limiter
    who = caller(requests_per_second=2, burst=3)
    for left in (2, 1, 0):
        assert header(limits.admit(who), "x-ratelimit-remaining-requests") == str(left)
    clock.now += 0.1  # 0.2 of a request refilled: 0.8 more to wait
    with pytest.raises(RateLimited) as refused:
        limits.admit(who)
    assert refused.value.retry_after == pytest.approx(0.4)
    assert header(refused.value.headers, "x-ratelimit-limit-requests") == "3"
    clock.now += 0.4
    limits.admit(who)  # served again exactly when it said
    clock.now += 100
    assert header(limits.admit(who), "x-ratelimit-remaining-requests") == "2"  # refilled to the burst, no further


def test_a_token_reservation_is_charged_only_what_it_used(limiter):
    limits, clock = limiter
    who = caller(tokens_per_minute=600)  # 10 tokens a second
    hold, headers = limits.reserve_tokens(who, 500)
    assert header(headers, "x-ratelimit-remaining-tokens") == "100"
    with pytest.raises(RateLimited) as refused:
        limits.reserve_tokens(who, 200)
    assert refused.value.retry_after == pytest.approx(10.0)  # 100 short at 10 a second
    limits.settle(hold, used=120)  # 380 come back
    limits.settle(hold, used=0)  # once only
    _, headers = limits.reserve_tokens(who, 480)
    assert header(headers, "x-ratelimit-remaining-tokens") == "0"
    assert header(headers, "x-ratelimit-reset-tokens") == "1m0s"


def test_rows_and_streams(limiter):
    limits, clock = limiter
    who = caller(rows_per_minute=120, concurrent_streams=2)
    limits.take_rows(who, 100)
    with pytest.raises(RateLimited) as refused:
        limits.take_rows(who, 30)
    assert refused.value.retry_after == pytest.approx(5.0)  # 10 rows short at 2 a second
    with pytest.raises(PayloadTooLarge, match="split it"):
        limits.take_rows(who, 121)
    first, second = limits.open_stream(who), limits.open_stream(who)
    with pytest.raises(RateLimited, match="2 streams open"):
        limits.open_stream(who)
    assert first is not None and second is not None
    first()
    first()  # closing twice closes one stream
    third = limits.open_stream(who)
    assert third is not None


def test_unlimited_dimensions_cost_nothing(limiter):
    limits, _ = limiter
    who = caller()
    assert limits.admit(who) == [] and limits.take_rows(who, 10**9) == []
    assert limits.reserve_tokens(who, 10**9) == (None, []) and limits.open_stream(who) is None


def _take_many(path: str, n: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    limits = Limiter(SharedBuckets(Path(path)), lambda: 0.0)  # a frozen clock: nothing refills
    who = Caller("shared", Tier(tokens_per_minute=1000), False, "test")
    taken = 0
    for _ in range(n):
        try:
            limits.reserve_tokens(who, 1)
            taken += 1
        except RateLimited:
            pass
    out.put(taken)


def test_fast_buckets_are_leased_per_worker_and_the_limit_still_holds_exactly(tmp_path):
    path = tmp_path / "limits.bin"
    clock = Clock()
    buckets = [SharedBuckets(path) for _ in range(2)]  # two workers' maps of one file
    taken_from_file = []
    for b in buckets:
        plain = b.take
        b.take = lambda *a, plain=plain, **k: taken_from_file.append(1) or plain(*a, **k)  # type: ignore[method-assign]
    workers = [Limiter(b, clock) for b in buckets]
    who = caller(requests_per_second=1000, burst=1000)  # a lease: 10 ms of refill, 10 requests
    served, locks_while_serving = 0, 0
    for i in range(1200):  # no time passes: exactly the burst is served, whichever worker takes the request
        try:
            workers[i % 2].admit(who)
            served += 1
            locks_while_serving = len(taken_from_file)
        except RateLimited as refused:
            assert 0 < refused.retry_after <= 0.002
    assert served == 1000
    assert locks_while_serving < 200  # leased: one shared lock per 11 requests while there was room
    clock.now += 0.5  # 500 refilled; a worker's expired lease goes back, no request is lost
    assert sum(1 for _ in range(500) if workers[0].admit(who)) == 500
    with pytest.raises(RateLimited):
        workers[1].admit(who)


def test_processes_share_the_buckets_without_losing_an_update(tmp_path):
    path = tmp_path / "limits.bin"
    SharedBuckets.reset(path)
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    workers = [context.Process(target=_take_many, args=(str(path), 700, out)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    # 1400 attempts on a bucket of 1000 that never refills: exactly 1000 are taken, however they interleave
    assert sum(out.get(timeout=5) for _ in workers) == 1000


def test_duration_format():
    assert [duration(s) for s in (0, 0.25, 1.5, 59.9, 60, 3723)] == ["0s", "250ms", "1.5s", "59.9s", "1m0s", "1h2m3s"]


def test_created_keys_keep_only_the_digest_and_a_running_registry_sees_new_and_revoked_keys(tmp_path):
    path = tmp_path / "keys.yaml"
    secret, record = create_key(path, "free", owner="alice@example.com")
    assert secret.startswith("fp_") and secret not in path.read_text() and record.sha256 == digest(secret)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert yaml.safe_load(path.read_text())["keys"][0] == {"id": "free-1", "sha256": record.sha256, "tier": "free",
                                                           "owner": "alice@example.com"}  # fmt: skip
    registry = KeyRegistry(path, Tiers.load(None))
    assert registry.identify(secret).id == "free-1" and registry.identify(secret).tier.requests_per_second == 5
    with pytest.raises(Unauthorized):
        registry.identify("fp_guess")
    second, _ = create_key(path, "pro", key_id="bob")
    registry._checked = 0.0  # a second has passed
    assert registry.identify(second).tier_name == "pro"
    revoke_key(path, "free-1")
    registry._checked = 0.0
    with pytest.raises(Unauthorized):
        registry.identify(secret)
    assert [r.id for r in read_keys(path)] == ["bob"]


def test_an_expired_key_is_refused_naming_the_day(tmp_path):
    path = tmp_path / "keys.yaml"
    secret, _ = create_key(path, "free", expires=dt.date(2026, 1, 1))
    registry = KeyRegistry(path, Tiers.load(None))
    registry.identify(secret, today=dt.date(2025, 12, 31))
    with pytest.raises(Unauthorized, match="expired on 2026-01-01"):
        registry.identify(secret, today=dt.date(2026, 1, 1))


@pytest.mark.parametrize(("text", "loc"), [
    ("tiers:\n  free: {requests_per_second: -1}\n", "tiers.free.requests_per_second"),
    ("tiers:\n  free: {request_per_second: 1}\n", "tiers.free.request_per_second"),
    ("tiers: [1, 2\n", "line"),
])  # fmt: skip
def test_a_broken_tiers_file_names_the_field(tmp_path, text, loc):
    path = tmp_path / "tiers.yaml"
    path.write_text(text)
    with pytest.raises(SettingsFileError) as broken:
        Tiers.load(path)
    assert broken.value.loc.startswith(loc) and str(path) in broken.value.message


def test_a_key_of_an_unknown_tier_is_refused_at_load(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - {{id: a, sha256: '{'0' * 64}', tier: gold}}\n")
    with pytest.raises(SettingsFileError, match="no tier 'gold'"):
        KeyRegistry(path, Tiers.load(None))
    path.write_text(f"keys:\n  - {{id: a, sha256: {'1' * 64}}}\n")
    with pytest.raises(SettingsFileError, match="keys.0.sha256: .*write it in quotes"):
        KeyRegistry(path, Tiers.load(None))


def test_the_meter_sums_per_key_model_and_day_and_survives_a_new_process(tmp_path):
    path = tmp_path / "usage.sqlite"
    day = ["2026-11-30"]
    meter = Meter(path, interval=3600, clock=lambda: day[0])
    meter.record("a", "digits", rows=32, seconds=0.002)
    meter.record("a", "digits", rows=8, seconds=0.001, error=True)
    day[0] = "2026-12-01"
    meter.record("a", "smollm2", prompt_tokens=37, cached_tokens=32, completion_tokens=64, seconds=0.5)
    meter.record("b", "smollm2", prompt_tokens=5, completion_tokens=1)
    assert read_usage(path) == []  # nothing written before the flush
    assert len(meter.query()) == 3  # but the server's own view has it
    assert meter.month_used("a") == (3, 101)  # this worker's, before any write
    meter.flush()
    assert meter.month_used("a") == (1, 101)  # November's requests are not December's
    meter.close()
    rows = read_usage(path, key="a")
    assert [(r["model"], r["day"], r["requests"], r["rows"], r["errors"]) for r in rows] == [
        ("digits", "2026-11-30", 2, 40, 1), ("smollm2", "2026-12-01", 1, 0, 0)]  # fmt: skip
    assert totals(read_usage(path, start="2026-12-01")) == {
        "requests": 2, "rows": 0, "prompt_tokens": 42, "cached_tokens": 32, "completion_tokens": 65,
        "compute_seconds": 0.5, "errors": 0}  # fmt: skip
    again = Meter(path, interval=3600, clock=lambda: "2026-12-02")  # a restart: the month's totals are read back
    assert again.month_used("a") == (1, 101)
    again.close()
    assert next_month("2026-12-02") == "2027-01-01"


def test_two_meters_on_one_file_add_up(tmp_path):
    path = tmp_path / "usage.sqlite"
    meters = [Meter(path, interval=3600, clock=lambda: "2026-12-01") for _ in range(2)]
    for meter in meters:
        for _ in range(50):
            meter.record("a", "iris", rows=1)
        meter.flush()
    assert meters[1].month_used("a") == (100, 0)  # the second wrote last: it read both workers' sums back
    for meter in meters:
        meter.close()
    assert read_usage(path)[0]["requests"] == 100


def test_a_streamed_answer_is_settled_once_however_it_ends():
    import asyncio
    import gc

    from forwardpass.server.http import Finally

    async def chunks():
        yield b"a"
        yield b"b"

    async def run() -> list[int]:
        counts = []
        for how in ("read to the end", "closed before the first chunk", "dropped unsent", "cancelled mid-way"):
            settled = []
            wrapped = Finally(chunks(), lambda s=settled: s.append(1))
            if how == "read to the end":
                assert [c async for c in wrapped] == [b"a", b"b"]
                await wrapped.aclose()
            elif how == "closed before the first chunk":
                await wrapped.aclose()
            elif how == "dropped unsent":
                del wrapped
                gc.collect()
            else:
                del wrapped  # settles the unused one: only the cancelled one counts below
                gc.collect()
                settled.clear()

                async def slow():
                    yield b"a"
                    await asyncio.sleep(10)
                    yield b"b"

                wrapped = Finally(slow(), lambda s=settled: s.append(1))

                async def read(it: Finally) -> None:
                    async for _ in it:
                        pass

                task = asyncio.ensure_future(read(wrapped))
                await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            counts.append(len(settled))
        return counts

    assert asyncio.run(run()) == [1, 1, 1, 1]


def test_psi_and_profiles():
    import numpy as np

    from forwardpass.monitoring.drift import Reference, compare, profile, psi

    rng = np.random.default_rng(0)
    train = rng.normal(size=(5000, 2))
    reference = Reference.build(train, ["a", "b"], classes=(train[:, 0] > 0).astype(int), n_classes=2)
    same = compare(reference, rng.normal(size=(2000, 2)), classes=np.zeros(0))
    assert same["status"] == "ok" and same["max_psi"] < 0.05
    moved = rng.normal(size=(2000, 2)) + [1.0, 0.0]
    found = compare(reference, moved, classes=(moved[:, 0] > 0).astype(int))
    assert [f["status"] for f in found["features"]] == ["drifting", "ok"] and found["prediction"]["psi"] > 0.25
    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0
    images = np.stack([np.full((3, 4, 4), v, np.float32) for v in (0.2, 0.6)])  # NCHW, flat channels
    rows, names = profile(images, (3, "NCHW"))
    assert names[:1] == ["channel 0 mean"] and rows.shape == (2, 6) and np.allclose(rows[:, 0], [0.2, 0.6])
    assert np.allclose(rows[:, 3:], 0)  # a flat image has no spread
    tokens, names = profile(np.array([[5, 6, 0, 0], [1, 2, 3, 0]]))
    assert names == ["length"] and tokens.ravel().tolist() == [2, 3]


def test_served_batches_wait_for_the_profiler_round_and_past_the_byte_bound_are_dropped(monkeypatch):
    import numpy as np

    from forwardpass.monitoring import drift
    from forwardpass.monitoring.drift import DriftMonitor, Reference

    rng = np.random.default_rng(1)
    reference = Reference.build(rng.normal(size=(500, 3)), ["a", "b", "c"], classes=rng.integers(0, 2, 500),
                                n_classes=2)  # fmt: skip
    monitor = DriftMonitor(reference, "x", None, "p", "classification", window=64, min_rows=1)
    with drift.PROFILER._round_lock:  # no round while the batches come in: they wait, unprofiled
        for i in range(40):
            monitor.observe({"x": np.full((1, 3), i, np.float32)}, {"p": np.array([[0.9, 0.1]], np.float32)})
        monitor.observe({"x": np.zeros((2, 5), np.float32)}, {"p": np.zeros((2, 2), np.float32)})  # another shape
        assert monitor.observed == 0 and len(monitor._pending) == 41
    drift.PROFILER.wait()
    assert monitor.observed == 40 and not monitor._pending  # 40 rows as one batch; the odd shape profiled apart, refused
    assert monitor._ring.rows[:40, 0].tolist() == list(range(40)) and monitor._ring.classes[:40].sum() == 0
    monkeypatch.setattr(drift, "PENDING_BYTES", 100)
    with drift.PROFILER._round_lock:
        for _ in range(20):
            monitor.observe({"x": np.zeros((1, 3), np.float32)}, {})  # 12 bytes each: 8 fit under 100
    assert monitor.dropped == 12
