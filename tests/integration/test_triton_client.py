"""The real tritonclient.http client against a real server."""

import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from forwardpass.demo import datasets  # noqa: E402


@pytest.fixture(scope="module")
def client(server):
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


def test_server_metadata_and_health(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "forwardpass"
    assert {"binary_tensor_data", "model_repository", "statistics"} <= set(meta["extensions"])


def test_model_metadata_config_and_readiness(client):
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    meta = client.get_model_metadata("digits")
    assert meta["versions"] == ["1"] and meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"] for o in meta["outputs"]} == {"label", "probabilities"}
    config = client.get_model_config("digits")
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [64]
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize("binary", [True, False])
def test_infer_json_and_binary(client, digits, binary):
    x = digits.X_test[:5].astype(np.float32)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
    result = client.infer("digits", [inp], outputs=outputs, request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    probs = result.as_numpy("probabilities")
    assert probs.shape == (5, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert labels == [str(int(np.argmax(p))) for p in probs]
    assert np.mean(np.asarray(labels) == digits.y_test[:5]) >= 0.8


def test_bytes_input_carries_png_into_pre_processing(client, digits):
    pngs = np.array([datasets.digit_png(r) for r in digits.X_test[:8]], dtype=np.object_)
    inp = httpclient.InferInput("image", [8], "BYTES")
    inp.set_data_from_numpy(pngs)
    labels = [v.decode() for v in client.infer("digits", [inp]).as_numpy("label")]
    assert np.mean(np.asarray(labels) == digits.y_test[:8]) >= 0.85


def test_async_infer_and_classification_extension(client, digits):
    x = digits.X_test[:3].astype(np.float32)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    pending = [client.async_infer("digits", [inp]) for _ in range(4)]
    results = [p.get_result().as_numpy("probabilities") for p in pending]
    assert all(np.array_equal(r, results[0]) for r in results)
    out = httpclient.InferRequestedOutput("probabilities", class_count=2)
    top = client.infer("digits", [inp], outputs=[out]).as_numpy("probabilities")
    assert top.shape == (3, 2)
    score, index, label = top[0, 0].decode().split(":")
    assert int(index) == int(np.argmax(results[0][0])) and label == index


def test_repository_index_load_unload(client):
    index = client.get_model_repository_index()
    assert {"name": "iris", "version": "1", "state": "READY"} in index
    client.unload_model("iris")
    assert not client.is_model_ready("iris")
    assert {"name": "iris", "version": "1", "state": "UNLOADED"} in client.get_model_repository_index()
    client.load_model("iris")
    assert client.is_model_ready("iris")


def test_statistics(client, digits):
    x = digits.X_test[:2].astype(np.float32)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    client.infer("digits", [inp])
    stats = client.get_inference_statistics("digits")["model_stats"][0]
    assert stats["name"] == "digits" and stats["inference_count"] >= 2
    assert stats["inference_stats"]["success"]["count"] >= 1


def test_errors_reach_the_client(client):
    with pytest.raises(InferenceServerException, match="no model 'nope'"):
        inp = httpclient.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
        client.infer("nope", [inp])
    bad = httpclient.InferInput("input", [1, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
    with pytest.raises(InferenceServerException, match=r"inputs.input: expected shape \[-1, 64\]"):
        client.infer("digits", [bad])
