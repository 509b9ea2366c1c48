"""The real tritonclient.http client against a real server: the app on a loopback socket with forwardpass's
own HTTP/1.1 protocol, in this process (fixtures.inprocess.SocketServer)."""

import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")
from fixtures import copy_models, image_model, write_model  # noqa: E402
from fixtures.inprocess import SocketServer  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from forwardpass.demo import datasets  # noqa: E402
from forwardpass.server.config import ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def server(demo_repo, tmp_path_factory):
    root = copy_models(demo_repo, tmp_path_factory.mktemp("triton") / "models", "digits", "iris")
    with SocketServer(ServeConfig(repository=root, poll_interval=0)) as srv:
        yield srv


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
    with pytest.raises(InferenceServerException, match="unknown model: 'nope' is not found"):
        inp = httpclient.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
        client.infer("nope", [inp])
    bad = httpclient.InferInput("input", [1, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
    with pytest.raises(InferenceServerException, match=r"inputs.input: expected shape \[-1, 64\]"):
        client.infer("digits", [bad])


def _add_model(server, client, name, config, model):
    """A model written into the running server's repository and loaded through the repository extension."""
    write_model(server.repository, name, config, model)
    client.load_model(name)
    assert client.is_model_ready(name)


def test_config_gives_each_input_the_format_image_clients_read(server, client):
    _add_model(server, client, "pixels-nchw", {"task": "custom", "pre": {"kind": "image", "resize": [8, 8], "layout": "NCHW"}},
               image_model(3, 8, 8, "NCHW"))  # fmt: skip
    config = client.get_model_config("pixels-nchw")
    # what Triton's image_client.py checks before sending: one input, NCHW or NHWC, three dims past the batch
    (image,) = config["input"]
    assert image["format"] == "FORMAT_NCHW" and config["max_batch_size"] > 0 and image["dims"] == [3, 8, 8]
    assert client.get_model_config("digits")["input"][0]["format"] == "FORMAT_NONE"  # flat pixels: no layout


def test_classification_of_an_output_without_batch_dimension_is_k_long(server, client):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "unbatched",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10])])  # fmt: skip
    _add_model(server, client, "unbatched", {"task": "custom"}, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert client.get_model_config("unbatched")["max_batch_size"] == 0
    x = np.array([0, 5, 1, 9, 2, 3, 4, 8, 6, 7], np.float32)
    inp = httpclient.InferInput("x", [10], "FP32")
    inp.set_data_from_numpy(x)
    top = client.infer("unbatched", [inp], outputs=[httpclient.InferRequestedOutput("y", class_count=3)]).as_numpy("y")
    assert top.shape == (3,)  # as Triton: no batch dimension to add
    assert [v.decode().split(":")[1] for v in top] == ["3", "7", "9"]


def test_load_with_a_config_override_or_files_is_refused(client):
    with pytest.raises(InferenceServerException, match=r"parameters.config: loading with a config override .* not supported"):
        client.load_model("iris", config='{"max_batch_size": 8}')
    assert client.is_model_ready("iris")


def test_sequence_parameters_are_refused_by_a_stateless_model(client):
    inp = httpclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException, match="parameters.sequence_id: model 'digits' keeps no state"):
        client.infer("digits", [inp], sequence_id=7, sequence_start=True)
    assert client.infer("digits", [inp]).as_numpy("label").shape == (1,)
