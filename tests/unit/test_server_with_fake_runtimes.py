"""The server in-process against fake runtimes (tests/fixtures/runtimes.py): what reaches the wire when the
forward pass answers, fails, returns NaN or takes its time, with no model file anywhere.

Slow passes are held at a gate and released by the test: every wait is on a state (a pass has reached the
gate, a future has its answer), never on a sleep.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from fixtures import classifier, fake_model, gate, opened
from fixtures.inprocess import InProcess

from forwardpass.server.config import ServeConfig

BODY = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}
ERRORS = [  # (error raised by the forward pass, status, wire type)
    ("InvalidInput", 400, "invalid_input"),
    ("Overloaded", 503, "overloaded"),
    ("ModelNotReady", 503, None),
    ("RequestTimeout", 504, None),
    ("ForwardpassError", 500, None),
    ("RuntimeError", 500, "internal_error"),
    ("MemoryError", 500, "internal_error"),
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fakes")
    fake_model(root, "echo", runtime={"kind": "echo", "scale": 2, "shift": 1})
    classifier(root, "colours", labels=("red", "green", "blue"))
    fake_model(root, "nan", runtime={"kind": "nan"})
    classifier(root, "nan-classifier", runtime={"kind": "nan"})
    for error, _, _ in ERRORS:
        classifier(root, f"fails-{error}", labels=("a", "b", "c", "d"),
                   runtime={"kind": "failing", "error": error, "message": f"fake {error}"})  # fmt: skip
    fake_model(root, "fails-to-load", runtime={"kind": "failing", "when": "load", "message": "no weights here"})
    fake_model(root, "held", runtime={"kind": "slow", "gate": "held"}, cache={"enabled": False},
               batching={"max_batch_size": 1, "max_queue_size": 1})  # fmt: skip
    return root


@pytest.fixture(scope="module")
def app(repo: Path) -> Iterator[InProcess]:
    with InProcess(ServeConfig(repository=repo, poll_interval=0)) as served:
        yield served


def ok(app: InProcess) -> None:
    r = app.post("/v2/models/echo/infer", json=BODY)
    assert r.status_code == 200, r.text


def test_echo_answers_a_fixed_function_of_its_input(app):
    r = app.post("/v2/models/echo/infer", json=BODY)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["name"] == "output" and out["shape"] == [2, 4] and out["data"] == [3, 5, 7, 9, 11, 13, 15, 17]
    meta = app.get("/v2/models/echo").json()  # what the runtime declares is what the server describes
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}]


def test_a_fake_classifier_answers_through_predict_with_labels(app):
    r = app.post("/v1/models/colours:predict", json={"instances": [[0, 0, 9], {"f0": 5, "f1": 1, "f2": 0}]})
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == ["blue", "red"]


@pytest.mark.parametrize(("error", "status", "kind"), ERRORS)
def test_an_error_in_the_forward_pass_reaches_the_wire_with_its_status(app, error, status, kind):
    for path, body in ((f"/v2/models/fails-{error}/infer", BODY),
                       (f"/v1/models/fails-{error}:predict", {"instances": [[1, 2, 3, 4]]})):  # fmt: skip
        r = app.post(path, json=body)
        assert r.status_code == status, r.text
        answer = r.json()
        if kind is not None:
            assert answer["type"] == kind
        if status == 500 and not error.startswith("Forwardpass"):  # a bug: its message stays in the log
            assert answer["error"] == f"internal error: {error}"
        else:
            assert f"fake {error}" in answer["error"]
        assert ("retry-after" in r.headers) == (status == 503)
    ok(app)


def test_unexpected_errors_are_counted_as_500s(app):
    before = _count_500s(app)
    assert app.post("/v2/models/fails-RuntimeError/infer", json=BODY).status_code == 500
    assert _count_500s(app) == before + 1


def _count_500s(app: InProcess) -> float:
    text = app.get("/metrics").text
    return sum(float(v) for v in re.findall(r'^forwardpass_requests_total\{[^}]*status="500"[^}]*\} (\S+)$', text, re.M))


def test_a_runtime_that_fails_to_load_is_unavailable_with_its_reason(app):
    r = app.post("/v2/models/fails-to-load/infer", json=BODY)
    assert r.status_code == 404 and "no weights here" in r.json()["error"], r.text
    index = {e["name"]: e for e in app.post("/v2/repository/index").json()}
    assert index["fails-to-load"]["state"] == "UNAVAILABLE" and index["fails-to-load"]["reason"] == "no weights here"
    assert index["echo"]["state"] == "READY"


def test_nan_outputs_are_answered_as_valid_json(app):
    for path, body in (("/v2/models/nan/infer", BODY), ("/v1/models/nan-classifier:predict", {"instances": [[1, 2, 3]]})):
        r = app.post(path, json=body)
        assert r.status_code < 500, r.text
        orjson.loads(r.content)  # strict JSON: no NaN literal on the wire
        assert b"NaN" not in r.content
    ok(app)


def test_a_full_queue_is_503_while_the_forward_pass_is_held(app):
    held = gate("held")
    with held.closed():
        before = held.inside
        running = app.start("POST", "/v2/models/held/infer", json=BODY)
        held.wait_inside(before + 1)  # the first request is in the forward pass
        queued = app.start("POST", "/v2/models/held/infer", json=BODY)
        _wait_queued(app, "held", 1)
        refused = app.post("/v2/models/held/infer", json=BODY)  # the queue (1) is full
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert "queue full" in refused.json()["error"]
        assert app.get("/v2/health/ready").status_code == 200  # the held pass is on a worker thread, not the loop
        assert not running.done() and not queued.done()
    assert running.result(10).status_code == 200 and queued.result(10).status_code == 200


def test_a_deadline_passes_while_the_request_waits_behind_a_held_pass(app):
    held = gate("held")
    with held.closed():
        before = held.inside
        running = app.start("POST", "/v2/models/held/infer", json=BODY)
        held.wait_inside(before + 1)
        late = app.start("POST", "/v2/models/held/infer", json={**BODY, "parameters": {"timeout": 50_000}})  # 50 ms
        try:
            answer = late.result(2)  # 40 times the deadline, while the pass ahead of it is still held
        except TimeoutError:
            answer = None
    assert running.result(10).status_code == 200
    assert answer is not None, "no answer 2 s after a 50 ms deadline"
    assert answer.status_code == 504 and "deadline" in answer.json()["error"], answer.text


def _wait_queued(app: InProcess, model: str, count: int, timeout: float = 10.0) -> None:
    """Until ``count`` requests wait behind the held one (bounded polling of the in-flight gauge)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = app.get("/metrics").text
        inflight = float(re.search(r"^forwardpass_inflight_requests (\S+)$", text, re.M).group(1))
        if inflight >= count + 2:  # the held one, the queued ones, this /metrics request
            return
        time.sleep(0.01)
    raise AssertionError(f"{count} requests not queued for {model} in {timeout} s")


def test_shutdown_finishes_the_request_in_the_forward_pass(tmp_path):
    root = tmp_path / "models"
    fake_model(root, "held", runtime={"kind": "slow", "gate": "drain"}, cache={"enabled": False})
    drain = gate("drain")
    app = InProcess(ServeConfig(repository=root, poll_interval=0, drain_timeout=10))
    runtimes = [r for r in opened if r.folder == root / "held"]
    with drain.closed():
        before = drain.inside
        answer = app.start("POST", "/v2/models/held/infer", json=BODY)
        drain.wait_inside(before + 1)
        closing = threading.Thread(target=app.close)
        closing.start()  # the lifespan's shutdown, as uvicorn sends it: it drains what is in flight
        deadline = time.monotonic() + 10
        while app.get("/v2/health/ready").status_code == 200:  # draining has begun once readiness is gone
            assert time.monotonic() < deadline, "shutdown did not begin"
            time.sleep(0.01)
        assert not answer.done()
    assert answer.result(10).status_code == 200
    closing.join(30)
    assert not closing.is_alive()
    assert runtimes and all(r.runs >= 1 for r in runtimes)
