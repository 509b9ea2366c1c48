"""Compressed request bodies (Content-Encoding: gzip, deflate), in both HTTP stacks, with httpx and tritonclient.

Both stacks run in this process: forwardpass's own protocol on a loopback socket, and the ASGI app (what
uvicorn serves with ``--http uvicorn``) through httpx's ASGI transport, which hands it the body as uvicorn
does, still encoded. tritonclient needs a socket: it talks to the first.
"""

from __future__ import annotations

import gzip
import zlib

import httpx
import numpy as np
import orjson
import pytest
from fixtures import copy_models
from fixtures.inprocess import InProcess, SocketServer

from forwardpass.server.config import ServeConfig

MAX_BODY = 1_000_000
X = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
BODY = orjson.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": X}]})


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.fixture(scope="module")
def served(demo_repo, tmp_path_factory):
    root = copy_models(demo_repo, tmp_path_factory.mktemp("encoding") / "models", "iris")
    with SocketServer(ServeConfig(repository=root, poll_interval=0, max_body_bytes=MAX_BODY)) as server:
        yield server


class Socket:
    """Requests over the loopback socket: forwardpass's own protocol reads the body."""

    def __init__(self, server: SocketServer):
        self.url = server.url

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=20, **kwargs)


@pytest.fixture(params=["forwardpass", "asgi"])
def srv(request, served) -> Socket | InProcess:
    return Socket(served) if request.param == "forwardpass" else served


def infer(srv: Socket | InProcess, content: bytes, encoding: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"} | ({"content-encoding": encoding} if encoding else {})
    return srv.post("/v2/models/iris/infer", content=content, headers=headers)


@pytest.mark.parametrize(("encoding", "compress"), [
    ("gzip", gzip.compress), ("GZIP", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress),
    ("deflate", raw_deflate), ("identity", lambda b: b), ("gzip, gzip", lambda b: gzip.compress(gzip.compress(b))),
    ("gzip", lambda b: gzip.compress(b[:40]) + gzip.compress(b[40:])),  # two gzip members, one body
])  # fmt: skip
def test_compressed_body_is_decoded(srv, encoding, compress):
    plain = infer(srv, BODY, None)
    r = infer(srv, compress(BODY), encoding)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == plain.json()["outputs"]


def test_other_encoding_is_415_naming_the_header(srv):
    r = infer(srv, BODY, "br")
    assert r.status_code == 415
    assert "Content-Encoding 'br' is not supported" in r.json()["error"] and "gzip or deflate" in r.json()["error"]


def test_zip_bomb_is_413(srv):
    bomb = gzip.compress(b" " * (50 * MAX_BODY))  # 50 KB that decode to 50 MB
    assert len(bomb) < MAX_BODY
    r = infer(srv, bomb, "gzip")
    assert r.status_code == 413 and f"over the limit of {MAX_BODY} bytes" in r.json()["error"]


@pytest.mark.parametrize("content", [b"not gzip at all", gzip.compress(BODY)[:-10]])
def test_corrupt_gzip_is_400(srv, content):
    r = infer(srv, content, "gzip")
    assert r.status_code == 400 and "gzip" in r.json()["error"]
    assert infer(srv, BODY, None).status_code == 200


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_request_compression(served, algorithm, binary):
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(served.url.removeprefix("http://"))
    x = np.asarray(X, np.float32)

    def labels(**kwargs):
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        return client.infer("iris", [inp], **kwargs).as_numpy("label").tolist()

    assert labels(request_compression_algorithm=algorithm) == labels()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_request_compression_through_the_asgi_app(served, algorithm, binary):
    # what tritonclient.http's infer() sends with request_compression_algorithm, built by its own encoder, to the
    # ASGI app: the compressed body, Inference-Header-Content-Length counting the uncompressed JSON header
    httpclient = pytest.importorskip("tritonclient.http")
    x = np.asarray(X, np.float32)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([inp])
    compress = gzip.compress if algorithm == "gzip" else zlib.compress
    headers = {"Content-Encoding": algorithm} | ({"Inference-Header-Content-Length": str(json_size)} if json_size else {})
    answer = served.post("/v2/models/iris/infer", content=compress(body), headers=headers)
    assert answer.status_code == 200, answer.text
    length = answer.headers.get("inference-header-content-length")
    result = httpclient.InferenceServerClient.parse_response_body(answer.content, header_length=length and int(length))
    plain = httpclient.InferenceServerClient(served.url.removeprefix("http://")).infer("iris", [inp])
    assert result.as_numpy("label").tolist() == plain.as_numpy("label").tolist()
