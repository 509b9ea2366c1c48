"""Every error the server can answer, each followed by a request that succeeds: the server stays up.

The app runs in-process (fixtures.inprocess: httpx's ASGI transport) over copies of the demo's small models:
what is checked is what the routes answer, which both HTTP stacks share; the wire itself is tested in
test_protocol.py and test_http_edges.py.
"""

import base64
import shutil

import numpy as np
import orjson
import pytest
import yaml
from fixtures import copy_models
from fixtures.inprocess import InProcess

from forwardpass.demo import datasets
from forwardpass.server.config import ServeConfig

MAX_BODY = 200_000
MAX_ELEMENTS = 10_000


@pytest.fixture(scope="module")
def srv(demo_repo, tmp_path_factory):
    root = copy_models(demo_repo, tmp_path_factory.mktemp("errors") / "models", "digits", "iris", "diabetes")
    shutil.copytree(root / "digits", root / "slow")  # same model, a long queue delay and a tiny queue
    config = yaml.safe_load((root / "slow" / "model.yaml").read_text())
    config["batching"] = {"max_batch_size": 64, "max_queue_delay_ms": 400, "max_queue_size": 2}
    config["cache"] = {"enabled": False}
    (root / "slow" / "model.yaml").write_text(yaml.safe_dump(config))
    with InProcess(ServeConfig(repository=root, poll_interval=0, max_body_bytes=MAX_BODY, max_elements=MAX_ELEMENTS)) as app:
        yield app


def v2(rows=1, cols=64, datatype="FP32", name="input", value=1.0):
    return {"inputs": [{"name": name, "shape": [rows, cols], "datatype": datatype, "data": [value] * (rows * cols)}]}


def ok(srv):
    """A request that must succeed after each error."""
    r = srv.post("/v2/models/digits/infer", json=v2(value=3.0))
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["name"] == "label"


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "message"),
    [
        ("/v2/models/digits/infer", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
         "malformed JSON"),
        ("/v2/models/digits/infer", {"json": {"inputs": "x"}}, 400, "expected a non-empty list"),
        ("/v2/models/nope/infer", {"json": v2()}, 404, "Request for unknown model: 'nope' is not found"),
        ("/v2/models/digits/versions/9/infer", {"json": v2()}, 404, "no version 9"),
        ("/v2/models/..%2Fetc/infer", {"json": v2()}, 404, ""),
        ("/v2/models/digits/infer", {"json": v2(cols=63)}, 400, "inputs.input: expected shape [-1, 64], got [1, 63]"),
        ("/v2/models/digits/infer", {"json": v2(datatype="INT32", value=1)}, 400, "inputs.input.datatype: expected FP32"),
        ("/v2/models/digits/infer", {"json": v2(name="pixels")}, 400, "inputs.pixels: unknown input"),
        ("/v2/models/digits/infer", {"json": {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                                          "data": [1.0] * 63}]}}, 400, "needs 64 elements, data has 63"),
        ("/v2/models/digits/infer", {"content": orjson.dumps(v2()).replace(b"1.0", b"1e999", 1),
                                     "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
        ("/v2/models/digits/infer", {"json": v2(rows=200)}, 400, f"more than this server accepts ({MAX_ELEMENTS})"),
        ("/v2/models/digits/infer", {"content": b"x" * (MAX_BODY + 1)}, 413, "over the limit"),
        ("/v2/models/digits/infer", {"content": orjson.dumps(v2()), "headers": {"content-type": "text/plain"}}, 415,
         "Content-Type 'text/plain'"),
        ("/v2/models/digits/infer", {"json": {**v2(), "outputs": [{"name": "logits"}]}}, 400, "outputs.logits: unknown"),
        ("/v1/models/iris:predict", {"json": {"instances": [{"sepal size": 1}]}}, 400, "unknown feature"),
        ("/v1/models/iris:predict", {"json": {"rows": []}}, 400, "instances"),
        ("/v2/models/digits/infer", {"content": b"{}", "headers": {"inference-header-content-length": "99"}}, 400,
         "Inference-Header-Content-Length"),
        ("/v2/nothing-here", {"json": {}}, 404, "no such endpoint"),
    ],
)  # fmt: skip
def test_error_then_success(srv, path, kwargs, status, message):
    r = srv.post(f"{path}", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    ok(srv)


def deep(levels: int, leaf: bytes = b"1.0") -> bytes:
    """``levels`` nested JSON lists around ``leaf``, as text (JSON writers stop long before 1,000 levels)."""
    return b"[" * levels + leaf + b"]" * levels


def raw(doc: dict, **replace: bytes) -> dict:
    """httpx.post keywords for ``doc`` as JSON, with the string values named in ``replace`` swapped for raw JSON."""
    body = orjson.dumps(doc)
    for marker, text in replace.items():
        body = body.replace(orjson.dumps(marker), text)
    return {"content": body, "headers": {"content-type": "application/json"}}


PROBS = "probabilities"


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "loc", "message"),
    [
        ("/v2/models/digits/infer", {"json": {**v2(), "outputs": [{"name": PROBS, "parameters": 5}]}}, 400,
         ["outputs", PROBS, "parameters"], "expected an object"),
        ("/v2/models/digits/infer", {"json": {**v2(), "outputs": [{"name": PROBS, "parameters": {"classification": True}}]}},
         400, ["outputs", PROBS, "parameters", "classification"], "expected an integer"),
        ("/v2/models/digits/infer", {"json": {**v2(), "outputs": [{"name": "label", "parameters": {"classification": 2}}]}},
         400, ["outputs", "label", "parameters", "classification"], "output 'label' is BYTES"),
        ("/v2/models/digits/infer", raw({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": "D"}]},
                                        D=deep(1000, b'"x"')), 400, ["inputs", "image", "data"], "nested deeper"),
        ("/v2/models/digits/infer", raw({**v2(), "parameters": {"x": "D"}}, D=deep(1000)), 400, ["parameters", "x"],
         "expected a string, a number or a boolean"),
        ("/v2/models/digits/infer", raw({**v2(), "outputs": [{"name": PROBS, "parameters": {"x": "D"}}]}, D=deep(1000)),
         400, ["outputs", PROBS, "parameters", "x"], "expected a string, a number or a boolean"),
        ("/v1/models/iris:predict", {"json": {"instances": [[5.1, 3.5, 1.4, 0.2]], "parameters": 5}}, 400,
         ["parameters"], "expected an object"),
        ("/v1/models/iris:predict", raw({"instances": [[5.1, 3.5, 1.4, 0.2]], "parameters": "D"}, D=deep(1000)), 400,
         ["parameters"], "expected an object"),
        ("/v2/models/digits/infer", {"json": {"inputs": v2()["inputs"] * 2}}, 400, ["inputs", 1, "name"], "given twice"),
        ("/v2/models/digits/infer", {"json": v2(value="0.5")}, 400, ["inputs", "input", "data"],
         "expected numbers for datatype FP32, got strings"),
        ("/v2/models/digits/infer", {"json": v2(datatype="INT64", value=1.5)}, 400, ["inputs", "input", "data"],
         "expected integers"),
        ("/v2/models/digits/infer", {"content": orjson.dumps(v2()), "headers": {"inference-header-content-length": str(10**30)}},
         400, ["Inference-Header-Content-Length"], "byte count"),
        ("/v2/models/digits/infer", {"json": {**v2(), "parameters": {"sequence_id": 7, "sequence_start": True}}}, 400,
         ["parameters", "sequence_id"], "keeps no state"),
        ("/v2/repository/models/iris/load", {"json": {"parameters": {"config": '{"max_batch_size": 8}'}}}, 400,
         ["parameters", "config"], "not supported"),
        ("/v2/repository/models/iris/load", {"json": {"parameters": {"file:1/model.onnx": "AAAA"}}}, 400,
         ["parameters", "file:1/model.onnx"], "not supported"),
    ],
)  # fmt: skip
def test_malformed_field_is_400_naming_it(srv, path, kwargs, status, loc, message):
    r = srv.post(f"{path}", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["detail"][0]["loc"] == loc and message in r.json()["error"], r.text
    ok(srv)


@pytest.mark.parametrize("version", ["\u0661", "\u00b2", "1" * 40])
def test_version_is_ascii_digits(srv, version):
    r = srv.post(f"/v2/models/digits/versions/{version}/infer", json=v2())
    assert r.status_code == 404 and "not a version number" in r.json()["error"], r.text
    ok(srv)


def test_wrong_method_is_405(srv):
    assert srv.get("/v2/models/digits/infer").status_code == 405
    ok(srv)


def test_timeout_is_504(srv):
    body = {**v2(), "parameters": {"timeout": 50_000}}  # 50 ms, while the slow model waits 400 ms to batch
    r = srv.post("/v2/models/slow/infer", json=body, timeout=10)
    assert r.status_code == 504, r.text
    assert "deadline" in r.json()["error"]
    ok(srv)


def test_full_queue_is_503_with_retry_after(srv):
    responses = srv.gather(*(("POST", "/v2/models/slow/infer", {"json": v2(value=i)}) for i in range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 2 and statuses.count(503) == 2
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1" and "queue full" in rejected.json()["error"]
    ok(srv)


def test_human_endpoint_with_base64_png(srv):
    d = datasets.load("digits")
    instances = [base64.b64encode(datasets.digit_png(x)).decode() for x in d.X_test[:6]]
    r = srv.post("/v1/models/digits:predict", json={"instances": instances})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert [p["label"] for p in predictions] == list(d.y_test[:6])
    assert all(0.0 <= p["probability"] <= 1.0 and len(p["top_k"]) == 3 for p in predictions)
    tf_style = [{"b64": s} for s in instances[:2]]  # TensorFlow Serving's convention works too
    assert srv.post("/v1/models/digits:predict", json={"instances": tf_style}).json()["predictions"] \
        == predictions[:2]  # fmt: skip


def test_human_endpoint_tabular_and_regression(srv):
    s = datasets.load("diabetes")
    rows = [dict(zip(s.feature_names, map(float, x))) for x in s.X_test[:3]]
    r = srv.post("/v1/models/diabetes:predict", json={"instances": rows})
    assert r.status_code == 200
    for p in r.json()["predictions"]:
        assert p["low"] < p["value"] < p["high"] and p["level"] == 0.9
    top1 = srv.post("/v1/models/iris:predict",
                      json={"instances": [[5.1, 3.5, 1.4, 0.2]], "parameters": {"top_k": 1}}).json()  # fmt: skip
    assert top1["predictions"][0]["label"] == "setosa" and len(top1["predictions"][0]["top_k"]) == 1


def test_metrics(srv):
    ok(srv)
    text = srv.get("/metrics").text
    assert 'forwardpass_requests_total{model="digits",status="200",version="1"}' in text
    assert 'forwardpass_requests_total{model="digits",status="400",version="1"}' in text
    for name in ("forwardpass_request_duration_seconds_bucket", "forwardpass_queue_duration_seconds_count",
                 "forwardpass_compute_duration_seconds_sum", "forwardpass_batch_size_bucket",
                 "forwardpass_cache_hits_total", "forwardpass_cache_misses_total", "forwardpass_inflight_requests"):  # fmt: skip
        assert name in text, name


def test_response_cache_hits_for_identical_requests(srv):
    body = v2(value=7.0)
    first = srv.post("/v2/models/digits/infer", json=body).json()
    before = srv.get("/v2/models/digits/stats").json()["model_stats"][0]["inference_stats"]["cache_hit"]
    again = srv.post("/v2/models/digits/infer", json={**body, "id": "second"}).json()
    after = srv.get("/v2/models/digits/stats").json()["model_stats"][0]["inference_stats"]["cache_hit"]
    assert after["count"] == before["count"] + 1
    assert again["outputs"] == first["outputs"] and again["id"] == "second"
    srv.post("/v2/models/digits/infer", json=v2(value=7.5))  # another tensor: a miss
    final = srv.get("/v2/models/digits/stats").json()["model_stats"][0]["inference_stats"]["cache_hit"]
    assert final["count"] == after["count"]


def binary_body(x: np.ndarray, outputs_binary: bool = True) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                      "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": outputs_binary}}]})  # fmt: skip
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def test_nan_in_binary_tensor_is_400_naming_the_input(srv):
    x = np.ones((3, 64), np.float32)
    x[2, 5] = np.nan
    body, headers = binary_body(x)
    r = srv.post("/v2/models/digits/infer", content=body, headers=headers)
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["inputs", "input"]
    assert "finite" in r.json()["error"]
    ok(srv)


def test_binary_request_without_content_type(srv):
    body, headers = binary_body(np.ones((2, 64), np.float32))
    r = srv.post("/v2/models/digits/infer", content=body, headers=headers)
    assert r.status_code == 200
    n = int(r.headers["inference-header-content-length"])
    meta = orjson.loads(r.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
    probs = np.frombuffer(r.content[n:], np.float32).reshape(2, 10)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
