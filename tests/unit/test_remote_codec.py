"""runtime: remote without a second forwardpass: its options, its codec against the server's own
(server/v2.py), and a small HTTP server on loopback that answers the ways a real forwardpass cannot be
made to (HTML, a 500, a 503 with Retry-After, a dropped connection).

The real second server is in tests/integration/test_remote_runtime.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from forwardpass.config import load_config
from forwardpass.errors import ModelConfigError, ModelLoadError, RemoteError
from forwardpass.inference import OutputTensor
from forwardpass.runtime import open_runtime
from forwardpass.runtime.remote import RemoteRuntime, decode_response, encode_request
from forwardpass.server.v2 import encode_response, parse_infer

# -- options: ModelConfigErrors at runtime.<field>, before any connection ---------------------------


def open_with(tmp_path: Path, runtime: dict[str, Any]) -> Any:
    file = tmp_path / "m" / "model.yaml"
    file.parent.mkdir(exist_ok=True)
    file.write_text(yaml.safe_dump({"task": "custom", "runtime": {"kind": "remote", **runtime}}))
    return open_runtime(load_config(file), file.parent, 1)


@pytest.mark.parametrize(
    ("runtime", "loc", "words"),
    [
        ({"url": "ftp://10.0.0.5/x", "model": "iris"}, "runtime.url", "http:// or https://"),
        ({"url": "http://", "model": "iris"}, "runtime.url", "with a host"),
        ({"url": "http://10.0.0.5:99999", "model": "iris"}, "runtime.url", "Port out of range"),
        ({"url": "http://10.0.0.5/?x=1", "model": "iris"}, "runtime.url", "?query"),
        ({"url": "http://u:p@10.0.0.5", "model": "iris"}, "runtime.url", "user:password@"),
        ({"url": "http://10.0.0.5"}, "runtime.model", "Field required"),
        ({"url": "http://10.0.0.5", "model": "iris", "timout_ms": 50}, "runtime.timout_ms", "Extra inputs"),
        ({"url": "http://10.0.0.5", "model": "iris", "timeout_ms": 0}, "runtime.timeout_ms", "greater than 0"),
        ({"url": "http://10.0.0.5", "model": "iris", "version": 0}, "runtime.version", "greater than or equal to 1"),
        ({"url": "http://10.0.0.5", "model": "iris", "headers": {"X-A": "1\r\nX-B: 2"}}, "runtime.headers", "line break"),
        ({"url": "http://10.0.0.5", "model": "iris", "api_key": "k", "api_key_env": "K"}, "runtime", "not both"),
        ({"url": "http://10.0.0.5", "model": "iris", "api_key_env": "FP_UNSET_KEY_FOR_TEST"}, "runtime.api_key_env",
         "FP_UNSET_KEY_FOR_TEST is not set"),
    ],
)
def test_bad_options_name_the_field(tmp_path: Path, runtime: dict[str, Any], loc: str, words: str) -> None:
    with pytest.raises(ModelConfigError) as caught:
        open_with(tmp_path, runtime)
    assert caught.value.loc == loc
    assert words in caught.value.msg
    assert str(tmp_path / "m" / "model.yaml") in str(caught.value)


def test_misspelled_option_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError) as caught:
        open_with(tmp_path, {"url": "http://10.0.0.5", "model": "iris", "binray": False})
    assert "remove 'binray' or correct its spelling" in caught.value.fix


# -- the codec: what we send is what the server's parser reads, and back -----------------------------

TENSORS = {
    "f32": np.array([[1.5, -2.0], [3.25, 1e30]], np.float32),
    "f64": np.array([0.1, -1e300], np.float64),
    "f16": np.array([[0.5, 2.0, -4.0]], np.float16),
    "i8": np.array([-128, 127], np.int8),
    "i64": np.array([[-(2**62), 2**62]], np.int64),
    "u8": np.array([0, 255], np.uint8),
    "u64": np.array([2**63 + 5], np.uint64),
    "flag": np.array([True, False, True]),
    "text": np.array([["héllo", ""], ["✓", "x" * 300]], dtype=object),
}


@pytest.mark.parametrize("binary", [True, False])
def test_requests_parse_as_the_server_reads_them(binary: bool) -> None:
    body, header_length = encode_request(TENSORS, ["out", "other"], binary=binary)
    assert (header_length is not None) == binary
    parsed = parse_infer(body, header_length, max_elements=10_000)
    got = {t.name: t for t in parsed.inputs}
    for name, array in TENSORS.items():
        assert list(got[name].shape) == list(array.shape)
        if array.dtype == object:  # the server reads BYTES as bytes
            assert got[name].array.tolist() == [[v.encode() for v in row] for row in array.tolist()]
        else:
            assert got[name].array.dtype == array.dtype
            np.testing.assert_array_equal(got[name].array, array)
    assert [o.name for o in parsed.outputs or []] == ["out", "other"]
    assert all(o.binary == binary for o in parsed.outputs or [])


def test_bytes_inputs_may_be_any_bytes_in_binary_mode() -> None:
    body, header_length = encode_request({"raw": np.array([b"\xff\x00", "ok"], dtype=object)}, ["y"])
    assert parse_infer(body, header_length, 100).inputs[0].array.tolist() == [b"\xff\x00", b"ok"]
    with pytest.raises(Exception, match="expected UTF-8 text.*runtime.binary: true"):
        encode_request({"raw": np.array([b"\xff"], dtype=object)}, ["y"], binary=False)


@pytest.mark.parametrize("binary", [True, False])
def test_responses_decode_as_the_server_writes_them(binary: bool) -> None:
    datatypes = {"f32": "FP32", "f64": "FP64", "f16": "FP16", "i8": "INT8", "i64": "INT64", "u8": "UINT8",
                 "u64": "UINT64", "flag": "BOOL", "text": "BYTES"}  # fmt: skip
    outputs = [OutputTensor(n, datatypes[n], a, binary) for n, a in TENSORS.items()]
    body, header_length = encode_response("m", 1, "req-1", outputs)
    got = decode_response(body, header_length)
    for name, array in TENSORS.items():
        assert got[name].shape == array.shape
        if array.dtype == object:
            assert got[name].tolist() == array.tolist()  # str, as ONNX Runtime gives string outputs
        else:
            assert got[name].dtype == array.dtype
            np.testing.assert_array_equal(got[name], array)
            assert got[name].flags.writeable  # post-processing and the cache get arrays of their own


@pytest.mark.parametrize(
    ("doc", "tail", "header", "words"),
    [
        ({"outputs": [{"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]},
         b"\x00" * 4, None, "past the binary data"),
        ({"outputs": [{"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}]},
         b"\x00" * 4, None, "needs 8 bytes, got 4"),
        ({"outputs": [{"name": "y", "datatype": "FP99", "shape": [1], "data": [1]}]}, b"", None, "not a V2 datatype"),
        ({"outputs": [{"name": "y", "datatype": "FP32", "shape": ["2"], "data": [1, 2]}]}, b"", None, "shape"),
        ({"outputs": [{"name": "y", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}, b"", None, "needs 3 elements"),
        ({"outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}]}, b"", None, "expected data"),
        ({"result": 1}, b"", None, "list of outputs"),
        ({"outputs": []}, b"", 10_000, "past the"),
    ],
)
def test_malformed_responses_are_value_errors(doc: Any, tail: bytes, header: int | None, words: str) -> None:
    head = json.dumps(doc).encode()
    with pytest.raises(ValueError, match=words):
        decode_response(head + tail, header if header is not None else (len(head) if tail else None))


# -- a remote that misbehaves ---------------------------------------------------------------------

METADATA = {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]}  # fmt: skip


class Remote(ThreadingHTTPServer):
    """A loopback HTTP server: metadata at /v2/models/m, and infer answered by ``self.answer``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.metadata: tuple[int, bytes] = (200, json.dumps(METADATA).encode())
        self.answer: tuple[int, dict[str, str], bytes] = (200, {}, b"")
        self.drop_next = 0  # infer requests to answer by closing the connection
        self.infers = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a V2 server does
    server: Remote

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        status, body = self.server.metadata
        self._send(status, {"Content-Type": "application/json"}, body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.infers += 1
        if self.server.drop_next:
            self.server.drop_next -= 1
            self.close_connection = True  # closed with no answer
            return
        self._send(*self.server.answer)


@pytest.fixture
def remote() -> Iterator[Remote]:
    server = Remote()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def v2_answer(y: np.ndarray) -> tuple[int, dict[str, str], bytes]:
    body, header_length = encode_response("m", 1, None, [OutputTensor("y", "FP32", y, True)])
    return 200, {"Inference-Header-Content-Length": str(header_length)}, body


X = {"x": np.ones((1, 2), np.float32)}


def test_metadata_that_is_not_v2_is_a_load_error(remote: Remote) -> None:
    remote.metadata = (200, b"<html>it works</html>")
    with pytest.raises(ModelLoadError, match=rf"{remote.url} did not answer V2 model metadata for model 'm'"):
        RemoteRuntime(remote.url, "m")
    remote.metadata = (200, json.dumps({"name": "m", "inputs": []}).encode())
    with pytest.raises(ModelLoadError, match="'inputs' is not a non-empty list"):
        RemoteRuntime(remote.url, "m")
    remote.metadata = (500, b'{"error": "disk on fire"}')
    with pytest.raises(ModelLoadError, match="answered 500 for model 'm': disk on fire"):
        RemoteRuntime(remote.url, "m")


@pytest.mark.parametrize(
    ("answer", "status", "words"),
    [
        ((200, {}, b"<html>hello</html>"), 502, "not a V2 inference response"),
        ((200, {}, json.dumps({"outputs": []}).encode()), 502, "no output 'y'"),
        ((500, {}, b'{"error": "CUDA out of memory"}'), 502, "answered 500: CUDA out of memory"),
        ((502, {}, b"Bad Gateway"), 502, "answered 502: Bad Gateway"),
        ((302, {"Location": "http://elsewhere/"}, b""), 502, "answered 302"),
        ((401, {}, b'{"error": "invalid API key"}'), 502, "refused our credentials"),
        ((503, {"Retry-After": "7"}, b'{"error": "model m is loading"}'), 503, "busy or not ready (503): model m is loading"),
        ((404, {}, b'{"error": "unknown model m"}'), 503, "is not served there any more: unknown model m"),
    ],
)
def test_remote_failures_are_clear_errors(remote: Remote, answer: Any, status: int, words: str) -> None:
    rt = RemoteRuntime(remote.url, "m")
    remote.answer = answer
    with pytest.raises(RemoteError) as caught:
        rt.run(X)
    assert caught.value.status == status
    assert words in caught.value.message and f"model 'm' at {remote.url}" in caught.value.message
    if answer[1].get("Retry-After"):
        assert caught.value.retry_after == 7
    rt.close()


def test_a_connection_dropped_unanswered_is_retried_once(remote: Remote) -> None:
    rt = RemoteRuntime(remote.url, "m")
    remote.answer = v2_answer(np.array([[1.0, 2.0]], np.float32))
    remote.drop_next = 1  # a kept-alive connection closed by the server as we reuse it: one retry
    np.testing.assert_array_equal(rt.run(X)[0], [[1.0, 2.0]])
    assert remote.infers == 2
    remote.drop_next = 2
    with pytest.raises(RemoteError, match="closed the connection without an answer") as caught:
        rt.run(X)
    assert caught.value.status == 503 and remote.infers == 4
    rt.close()


def test_a_misspelt_runtime_option_is_matched_against_the_runtime_s_own_fields(tmp_path):
    from forwardpass.config import load_config
    from forwardpass.errors import ModelConfigError
    from forwardpass.runtime.remote import from_config

    (tmp_path / "model.yaml").write_text("task: custom\nruntime: {kind: remote, url: 'http://127.0.0.1:9', model: m, "
                                         "timout_ms: 10}\n")  # fmt: skip
    with pytest.raises(ModelConfigError) as error:
        from_config(load_config(tmp_path / "model.yaml"), tmp_path, 1)
    assert error.value.loc == "runtime.timout_ms" and "did you mean 'timeout_ms'?" in error.value.fix
