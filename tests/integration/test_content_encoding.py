"""Compressed request bodies (Content-Encoding: gzip, deflate), in both HTTP stacks, with httpx and tritonclient."""

from __future__ import annotations

import gzip
import shutil
import zlib

import httpx
import numpy as np
import orjson
import pytest
from serverproc import Server

MAX_BODY = 1_000_000
X = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
BODY = orjson.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": X}]})


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.fixture(scope="module", params=["forwardpass", "uvicorn"])
def srv(request, demo_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"encoding-{request.param}") / "models"
    shutil.copytree(demo_repo / "iris", root / "iris")
    server = Server(root, env={"FORWARDPASS_MAX_BODY_BYTES": str(MAX_BODY)}, args=("--http", request.param))
    yield server
    server.stop()


def infer(srv: Server, content: bytes, encoding: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"} | ({"content-encoding": encoding} if encoding else {})
    return httpx.post(f"{srv.url}/v2/models/iris/infer", content=content, headers=headers, timeout=20)


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
def test_tritonclient_request_compression(srv, algorithm, binary):
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(srv.url.removeprefix("http://"))
    x = np.asarray(X, np.float32)

    def labels(**kwargs):
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        return client.infer("iris", [inp], **kwargs).as_numpy("label").tolist()

    assert labels(request_compression_algorithm=algorithm) == labels()
