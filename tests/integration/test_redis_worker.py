"""The Redis Streams worker against a real redis-server on loopback: every event scored once, a poison event
dead-lettered after its deliveries while the rest flow, a SIGKILLed worker's events claimed by another with
nothing lost, SIGTERM finishing the batch in hand, two workers sharing a group."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import copy_models

redis = pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed (.ci/run installs it: apt-get install redis-server)",
                allow_module_level=True)  # fmt: skip

from forwardpass.repository import Repository  # noqa: E402
from forwardpass.streaming.redis import Worker, WorkerOptions  # noqa: E402

IRIS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]


def redis_server(folder: Path) -> tuple[subprocess.Popen, redis.Redis]:
    """A redis-server of its own, answering: a free loopback port, its data in ``folder``, no persistence."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)  # fmt: skip
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc, client
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, redis.Redis]]:
    proc, client = redis_server(tmp_path)
    yield f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}", client
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def repo(demo_repo: Path, tmp_path: Path) -> Path:
    return copy_models(demo_repo, tmp_path / "models", "iris")


def produce(client, n: int, poison: set[int] = frozenset()) -> list[str]:
    pipe = client.pipeline()
    for i in range(n):
        row = {IRIS[0]: 5.1 + i % 3, IRIS[1]: 3.5, IRIS[2]: 1.4 + i % 5, IRIS[3]: 0.2}
        if i in poison:
            row[IRIS[0]] = "not a number"
        pipe.xadd("readings", row)
    return [i.decode() for i in pipe.execute()]


def results(client) -> list[dict]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in client.xrange("scores")]


def wait_for(check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def options(url: str, **extra) -> WorkerOptions:
    return WorkerOptions(source=f"{url}/readings", sink=f"{url}/scores", group="g", **extra)


def start(repo: Path, opts: WorkerOptions) -> tuple[Worker, threading.Thread]:
    worker = Worker(Repository(repo), "iris", opts)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return worker, thread


def test_every_event_is_scored_once_and_acknowledged(server, repo):
    url, client = server
    ids = produce(client, 300)
    worker, thread = start(repo, options(url, consumer="w1", batch_size=64))
    wait_for(lambda: client.xlen("scores") >= 300)
    worker.stop.set()
    thread.join(30)
    out = results(client)
    assert sorted(r["source_id"] for r in out) == sorted(ids)
    assert all(json.loads(r["result"])["label"] in ("setosa", "versicolor", "virginica") for r in out)
    assert client.xpending("readings", "g")["pending"] == 0
    assert worker.stats.events == 300 and worker.stats.batches >= 5
    status = worker.status()
    assert status["events"] == 300 and status["pending"] == 0 and status["lag"] == 0 and status["dead_letters"] == 0
    assert 0 <= status["latency_p50_ms"] <= status["latency_p99_ms"] and status["events_per_second"] > 0


def test_a_poison_event_goes_to_the_dead_letters_after_its_deliveries_and_the_rest_flow(server, repo):
    url, client = server
    ids = produce(client, 50, poison={7})
    worker, thread = start(repo, options(url, consumer="w1", max_deliveries=3, claim_idle_ms=100))
    wait_for(lambda: client.xlen("readings:dead") >= 1)
    worker.stop.set()
    thread.join(30)
    assert sorted(r["source_id"] for r in results(client)) == sorted(ids[:7] + ids[8:])
    ((_, dead),) = client.xrange("readings:dead")
    assert dead[b"source_id"].decode() == ids[7] and int(dead[b"deliveries"]) == 3
    assert b"sepal length (cm): expected a number" in dead[b"error"]
    assert client.xpending("readings", "g")["pending"] == 0


def _cli(repo: Path, url: str, consumer: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "forwardpass", "stream", "iris", "--source", f"{url}/readings",
                             "--sink", f"{url}/scores", "--group", "g", "--consumer", consumer, "--batch-size", "50",
                             "-r", str(repo), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def test_a_killed_workers_events_are_claimed_by_another_and_nothing_is_lost(server, repo):
    url, client = server
    ids = produce(client, 3000)
    first = _cli(repo, url, "w1")
    wait_for(lambda: client.xlen("scores") >= 200)
    first.send_signal(signal.SIGKILL)  # mid-stream: events it read stay pending under w1
    first.wait(10)
    second = _cli(repo, url, "w2", "--claim-idle-ms", "300")
    try:
        wait_for(lambda: {r["source_id"] for r in results(client)} >= set(ids), timeout=120)
        wait_for(lambda: client.xpending("readings", "g")["pending"] == 0)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    out = [r["source_id"] for r in results(client)]
    assert set(out) == set(ids)
    duplicates = len(out) - len(set(out))
    assert duplicates == 0  # one server: the result, its done mark and the ack are one transaction


def test_sigterm_finishes_the_batch_in_hand_acks_and_exits_0(server, repo):
    url, client = server
    produce(client, 400)
    worker = _cli(repo, url, "w1")
    wait_for(lambda: client.xlen("scores") >= 50)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    written = client.xlen("scores")
    pending = client.xpending("readings", "g")["pending"]
    assert pending == 0, f"{pending} events read and not acknowledged at exit ({written} written)"


def test_two_workers_in_one_group_share_the_events(server, repo):
    url, client = server
    ids = produce(client, 1000)
    a, ta = start(repo, options(url, consumer="a", batch_size=50))
    b, tb = start(repo, options(url, consumer="b", batch_size=50))
    wait_for(lambda: client.xlen("scores") >= 1000)
    a.stop.set()
    b.stop.set()
    ta.join(30)
    tb.join(30)
    out = [r["source_id"] for r in results(client)]
    assert sorted(out) == sorted(ids)
    assert a.stats.events > 0 and b.stats.events > 0 and a.stats.events + b.stats.events == 1000


def test_a_sink_on_another_server_gets_each_result_and_the_done_set_skips_what_was_written(server, tmp_path, repo):
    """Source and sink on two servers: the sink is written before the ack, and an id the done-set holds is acked
    without being run again (what a crash between the two leaves behind)."""
    url, client = server
    sink_dir = tmp_path / "sink"
    sink_dir.mkdir()
    proc, other = redis_server(sink_dir)
    port = other.connection_pool.connection_kwargs["port"]
    try:
        ids = produce(client, 100)
        other.zadd("scores:done", {ids[3]: 1, ids[4]: 1})  # written by a worker that died before its ack
        worker = Worker(Repository(repo), "iris", WorkerOptions(source=f"{url}/readings", group="g", consumer="w",
                                                                sink=f"redis://127.0.0.1:{port}/scores"))  # fmt: skip
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        wait_for(lambda: other.xlen("scores") >= 98 and client.xpending("readings", "g")["pending"] == 0)
        worker.stop.set()
        thread.join(30)
        out = [r["source_id"] for r in results(other)]
        assert sorted(out) == sorted(ids[:3] + ids[5:]) and worker.stats.skipped == 2
        assert other.zcard("scores:done") == 100
    finally:
        proc.terminate()
        proc.wait(10)



def test_the_worker_serves_its_metrics(server, repo):
    import httpx

    url, client = server
    produce(client, 40, poison={5})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker, thread = start(repo, options(url, consumer="m", metrics_port=port, max_deliveries=1))
    try:
        wait_for(lambda: client.xlen("scores") >= 39 and client.xlen("readings:dead") == 1)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        worker.stop.set()
        thread.join(30)
    assert 'forwardpass_stream_events{consumer="m",model="iris"} 39.0' in text
    assert 'forwardpass_stream_dead_letters{consumer="m",model="iris"} 1.0' in text
    assert "forwardpass_stream_latency_p99_ms" in text and "forwardpass_stream_lag" in text
