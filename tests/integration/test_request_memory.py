"""Large request bodies are freed once they are answered: the server's RSS comes back (issue 13, point 8).

The bodies go to requests the server refuses after reading them (an unknown model, malformed
JSON), so that what is measured is the HTTP layer's buffers and the JSON parse, not ONNX Runtime's
memory arena, which keeps what a big batch needed (see the issue's notes).
"""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest
from serverproc import Server

BODY = b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [' + b"0.5, " * 8_000_000 + b"0.5"
MARGIN_MB = 25


@pytest.fixture
def srv(demo_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("memory") / "models"
    shutil.copytree(demo_repo / "iris", root / "iris")
    server = Server(root)
    yield server  # a fresh server per test: its RSS before is the baseline
    server.stop()


def rss_mb(server: Server) -> float:
    with open(f"/proc/{server.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def settled_rss_mb(server: Server, below: float, timeout: float = 10.0) -> float:
    """The server's RSS once it is under ``below`` MB, or what it is after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (rss := rss_mb(server)) >= below and time.monotonic() < deadline:
        time.sleep(0.1)
    return rss


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's RSS in /proc")
@pytest.mark.parametrize("connections", ["one per request", "one kept alive"])
def test_big_request_bodies_are_freed_after_the_answer(srv, connections):
    complete = BODY + b"]}]}"
    cases = [("/v2/models/nope/infer", complete, 404), ("/v2/models/iris/infer", BODY, 400)]  # BODY: cut short
    assert len(complete) > 40_000_000
    before = rss_mb(srv)
    client = httpx.Client(base_url=srv.url, timeout=60)
    try:
        for _ in range(2):
            for path, body, status in cases:
                if connections == "one per request":
                    with httpx.Client(base_url=srv.url, timeout=60) as fresh:
                        assert fresh.post(path, content=body).status_code == status
                else:
                    assert client.post(path, content=body).status_code == status
        after = settled_rss_mb(srv, below=before + MARGIN_MB)
    finally:
        client.close()
    assert after < before + MARGIN_MB, f"RSS {before:.0f} MB before four 40 MB requests, {after:.0f} MB after"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's RSS in /proc")
def test_a_big_batch_does_not_keep_its_memory(srv):
    # 2,000,000 iris rows in one 40 MB JSON request, run by the model: ONNX Runtime's arena grows for it
    # and must give that back afterwards (it kept +54 MB for good before it was told to shrink)
    rows = 2_000_000
    body = (b'{"inputs": [{"name": "input", "shape": [%d, 4], "datatype": "FP32", "data": [' % rows
            + b"0.5, " * (4 * rows - 1) + b'0.5]}], "outputs": [{"name": "label"}]}')  # fmt: skip
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        assert client.post("/v2/models/iris/infer", json=ROW_SMALL).status_code == 200  # warm: arena for one row
        before = rss_mb(srv)
        for _ in range(2):
            answer = client.post("/v2/models/iris/infer", content=body)
            assert answer.status_code == 200, answer.text[:200]
            assert answer.json()["outputs"][0]["shape"] == [rows]
            del answer
    after = settled_rss_mb(srv, below=before + MARGIN_MB)
    assert after < before + MARGIN_MB, f"RSS {before:.0f} MB before two 2M-row batches, {after:.0f} MB after"


ROW_SMALL = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
