"""runtime: remote against a real second `forwardpass serve` on another loopback port.

    client ──► front server (models whose runtime is remote) ──► [tcp proxy] ──► upstream server (iris, echo)

The upstream requires an API key (the front's models send it as ``Authorization: Bearer``). A small TCP
proxy in this file sits in front of the upstream where a test needs to count connections (the pool), stall
the network (accept and read, never answer: a timeout) or take the remote away (connection refused).
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from fixtures import write_model
from onnx import TensorProto, helper
from serverproc import Server, free_port

import forwardpass
from forwardpass.errors import InvalidInput, ModelConfigError, ModelLoadError, RemoteError
from forwardpass.runtime.remote import RemoteRuntime

KEY = "upstream-test-key"
KEY_ENV = "FP_TEST_UPSTREAM_KEY"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5], [4.6, 3.1, 1.5, 0.2]]
FEATURES = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
SLOW_TIMEOUT_MS = 400


class Proxy:
    """A TCP proxy on a free loopback port in front of a real server: counts the connections it accepts,
    can stall (read requests and drop them: no answer ever comes) or close (connection refused after)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self.stalled = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.accepted += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, requests: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            if requests and self.stalled.is_set():
                continue  # swallowed: the request never reaches the server, no answer ever comes
            try:
                target.sendall(data)
            except OSError:
                break
        for s in (source, target):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Stop listening (new connections are refused) and drop every open connection."""
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def echo_model() -> Any:
    """BYTES text [N] -> BYTES echo [N] (Identity on strings)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])], "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["N"])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def remote_folder(repo: Path, name: str, config: dict[str, Any]) -> Path:
    """A model folder whose forward pass is remote: model.yaml and an empty version folder 1."""
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def iris_config(demo_repo: Path, **runtime: Any) -> dict[str, Any]:
    """The demo iris's model.yaml (tabular pre, labels, post) with a remote runtime."""
    config = yaml.safe_load((demo_repo / "iris" / "model.yaml").read_text())
    config.pop("metrics", None)
    config["runtime"] = {"kind": "remote", **runtime}
    return config


@pytest.fixture(scope="module")
def upstream(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The remote: iris, a spare copy of iris (removed by a test), echo (BYTES); an API key required."""
    repo = tmp_path_factory.mktemp("upstream") / "models"
    shutil.copytree(demo_repo / "iris", repo / "iris")
    shutil.copytree(demo_repo / "iris", repo / "iris-spare")
    write_model(repo, "echo", {"task": "custom"}, echo_model())
    srv = Server(repo, poll_interval=0.2, args=("--api-key", KEY))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def proxies(upstream: Server) -> Iterator[dict[str, Proxy]]:
    made = {name: Proxy(upstream.port) for name in ("pooled", "stalled", "gone")}
    yield made
    for proxy in made.values():
        try:
            proxy.close()
        except OSError:
            pass


@pytest.fixture(scope="module")
def front_repo(demo_repo: Path, upstream: Server, proxies: dict[str, Proxy],
               tmp_path_factory: pytest.TempPathFactory) -> Path:  # fmt: skip
    repo = tmp_path_factory.mktemp("front") / "models"
    key = {"api_key_env": KEY_ENV}
    remote_folder(repo, "remote-iris", iris_config(demo_repo, url=proxies["pooled"].url, model="iris", version=1,
                                                   max_connections=4, **key))  # fmt: skip
    remote_folder(repo, "remote-iris-json", iris_config(demo_repo, url=upstream.url, model="iris", binary=False,
                                                        api_key=KEY))  # fmt: skip
    remote_folder(repo, "remote-echo", {"task": "custom", "runtime": {"kind": "remote", "url": upstream.url,
                                                                      "model": "echo", **key}})  # fmt: skip
    remote_folder(repo, "remote-slow", iris_config(demo_repo, url=proxies["stalled"].url, model="iris",
                                                   timeout_ms=SLOW_TIMEOUT_MS, **key))  # fmt: skip
    remote_folder(repo, "remote-gone", iris_config(demo_repo, url=proxies["gone"].url, model="iris", **key))
    remote_folder(repo, "remote-spare", iris_config(demo_repo, url=upstream.url, model="iris-spare", **key))
    nan = iris_config(demo_repo, url=upstream.url, model="iris", **key)
    nan["inputs"][0]["allow_nan"] = True  # we let NaN through; the remote's iris refuses it: its 400
    remote_folder(repo, "remote-nan", nan)
    remote_folder(repo, "remote-nowhere", iris_config(demo_repo, url=f"http://127.0.0.1:{free_port()}", model="iris"))
    remote_folder(repo, "remote-nokey", iris_config(demo_repo, url=upstream.url, model="iris"))
    remote_folder(repo, "remote-unknown", iris_config(demo_repo, url=upstream.url, model="lily", **key))
    remote_folder(repo, "remote-ftp", iris_config(demo_repo, url="ftp://127.0.0.1/iris", model="iris"))
    return repo


@pytest.fixture(scope="module")
def front(front_repo: Path) -> Iterator[Server]:
    srv = Server(front_repo, env={KEY_ENV: KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(front: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=front.url, timeout=30) as c:
        yield c


def instances(rows: list[list[float]]) -> list[dict[str, float]]:
    return [dict(zip(FEATURES, row)) for row in rows]


def binary_infer(inputs: list[tuple[str, str, list[int], bytes]], binary_output: bool) -> tuple[bytes, dict[str, str]]:
    """A V2 binary-tensor body (what tritonclient sends): JSON header, then the raw tensors."""
    head = {"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(raw)}}
                       for n, d, s, raw in inputs],
            "parameters": {"binary_data_output": binary_output}}  # fmt: skip
    encoded = json.dumps(head).encode()
    return encoded + b"".join(raw for *_, raw in inputs), {"Inference-Header-Content-Length": str(len(encoded)),
                                                             "Content-Type": "application/octet-stream"}  # fmt: skip


def read_binary_outputs(response: httpx.Response) -> dict[str, Any]:
    """A V2 response's outputs, JSON or binary, as {name: list of values}."""
    length = response.headers.get("inference-header-content-length")
    head = response.content if length is None else response.content[: int(length)]
    doc = json.loads(head)
    tail, out = memoryview(response.content)[len(head):], {}
    for item in doc["outputs"]:
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[item["name"]] = item["data"]
            continue
        raw, tail = tail[:size], tail[size:]
        if item["datatype"] == "BYTES":
            values, pos = [], 0
            while pos < len(raw):
                (n,) = struct.unpack_from("<I", raw, pos)
                values.append(bytes(raw[pos + 4 : pos + 4 + n]).decode())
                pos += 4 + n
            out[item["name"]] = values
        else:
            out[item["name"]] = np.frombuffer(raw, dtype=np.float32).tolist()
    return out


# -- answers through our server equal the remote's own ---------------------------------------------


@pytest.mark.parametrize("model", ["remote-iris", "remote-iris-json"])
def test_predict_matches_the_remote(client: httpx.Client, upstream: Server, model: str) -> None:
    direct = httpx.post(f"{upstream.url}/v1/models/iris:predict", json={"instances": instances(ROWS)}, headers=AUTH)
    through = client.post(f"/v1/models/{model}:predict", json={"instances": instances(ROWS)})
    assert direct.status_code == through.status_code == 200, through.text
    assert through.json()["predictions"] == direct.json()["predictions"]
    assert [p["label"] for p in through.json()["predictions"]] == ["setosa", "virginica", "versicolor", "setosa"]


@pytest.mark.parametrize("binary_output", [False, True])
@pytest.mark.parametrize("model", ["remote-iris", "remote-iris-json"])
def test_v2_infer_matches_the_remote(client: httpx.Client, upstream: Server, model: str, binary_output: bool) -> None:
    x = np.asarray(ROWS, np.float32)
    body, headers = binary_infer([("input", "FP32", [4, 4], x.tobytes())], binary_output)
    direct = httpx.post(f"{upstream.url}/v2/models/iris/infer", content=body, headers={**headers, **AUTH})
    through = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert direct.status_code == through.status_code == 200, through.text
    got, want = read_binary_outputs(through), read_binary_outputs(direct)
    assert got["probabilities"] == want["probabilities"]
    assert got["label"] == want["label"] == ["setosa", "virginica", "versicolor", "setosa"]


def test_metadata_comes_from_the_remote(client: httpx.Client) -> None:
    meta = client.get("/v2/models/remote-echo").json()  # model.yaml declares no inputs or outputs
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "echo", "datatype": "BYTES", "shape": [-1]}]


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_tensors_round_trip(client: httpx.Client, binary: bool) -> None:
    words = ["héllo", "", "wörld ✓", "x" * 300]
    if binary:
        raw = b"".join(struct.pack("<I", len(w.encode())) + w.encode() for w in words)
        body, headers = binary_infer([("text", "BYTES", [len(words)], raw)], True)
        answer = client.post("/v2/models/remote-echo/infer", content=body, headers=headers)
    else:
        answer = client.post("/v2/models/remote-echo/infer",
                             json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [4], "data": words}]})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert read_binary_outputs(answer)["echo"] == words


def test_concurrent_requests_share_a_small_pool(client: httpx.Client, front_repo: Path, proxies: dict[str, Proxy],
                                                upstream: Server) -> None:  # fmt: skip
    local = forwardpass.load("iris", repository=upstream.repository)
    rng = np.random.default_rng(0)
    rows = (rng.uniform(0.5, 7.0, size=(64, 4))).round(1).tolist()
    before = proxies["pooled"].accepted

    def one(i: int) -> tuple[Any, Any]:
        answer = client.post("/v1/models/remote-iris:predict", json={"instances": instances([rows[i]])})
        assert answer.status_code == 200, answer.text
        return answer.json()["predictions"][0], local.predict(dict(zip(FEATURES, rows[i])))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(len(rows))))
    for got, want in results:
        assert got["label"] == want["label"]
        assert got["probability"] == pytest.approx(want["probability"], rel=1e-6)
    assert proxies["pooled"].accepted - before <= 4  # max_connections: kept alive and reused


def test_runtime_is_thread_safe_with_one_pool(upstream: Server) -> None:
    proxy = Proxy(upstream.port)
    try:
        rt = RemoteRuntime(proxy.url, "iris", max_connections=3, api_key=KEY)
        x = np.asarray(ROWS, np.float32)
        (want,) = rt.run({"input": x}, ["probabilities"])

        def many(_: int) -> bool:
            return all(np.array_equal(rt.run({"input": x}, ["probabilities"])[0], want) for _ in range(25))

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(many, range(8)))
        assert proxy.accepted <= 3
        rt.close()
        with pytest.raises(RemoteError, match="retired"):
            rt.run({"input": x})
    finally:
        proxy.close()


# -- the Python API: the same answers as the local model ---------------------------------------------


def test_python_api_matches_the_local_model(front_repo: Path, upstream: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    remote = forwardpass.load("remote-iris", repository=front_repo)
    local = forwardpass.load("iris", repository=upstream.repository)
    assert remote.predict(instances(ROWS)) == local.predict(instances(ROWS))
    x = np.asarray(ROWS, np.float32)
    assert remote.predict(x) == local.predict(x)
    np.testing.assert_array_equal(remote.run({"input": x})["probabilities"], local.run({"input": x})["probabilities"])
    with pytest.raises(InvalidInput) as bad:
        remote.predict({"sepal length (cm)": "abc"})  # refused here, before any call
    assert bad.value.loc[0] == "instances"
    remote.runtime.close()


def test_python_api_load_errors(front_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(ModelConfigError) as ftp:
        forwardpass.load("remote-ftp", repository=front_repo)
    assert ftp.value.loc == "runtime.url" and "http://" in ftp.value.msg
    with pytest.raises(ModelLoadError, match=r"answered 404 for model 'lily'.*correct runtime.model"):
        forwardpass.load("remote-unknown", repository=front_repo)
    with pytest.raises(ModelLoadError, match=r"answered 401 .*runtime.api_key"):
        forwardpass.load("remote-nokey", repository=front_repo)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ModelConfigError) as env:
        forwardpass.load("remote-iris", repository=front_repo)
    assert env.value.loc == "runtime.api_key_env" and KEY_ENV in env.value.msg


# -- failures: clear errors, the right statuses, bounded in time -------------------------------------


def test_remote_400_is_our_400_with_its_message(client: httpx.Client) -> None:
    x = np.asarray([[np.nan, 3.0, 1.0, 0.2]], np.float32)
    body, headers = binary_infer([("input", "FP32", [1, 4], x.tobytes())], False)
    answer = client.post("/v2/models/remote-nan/infer", content=body, headers=headers)
    assert answer.status_code == 400, answer.text
    assert answer.json()["type"] == "invalid_input"
    assert "the remote model rejected the inputs" in answer.json()["error"]
    assert "expected finite numbers" in answer.json()["error"]  # the remote's own message


def test_versions_that_cannot_reach_their_remote_are_unavailable_with_the_reason(client: httpx.Client,
                                                                                    front_repo: Path) -> None:  # fmt: skip
    index = {m["name"]: m for m in client.post("/v2/repository/index", json={}).json()}
    assert index["remote-iris"]["state"] == "READY"
    nowhere = yaml.safe_load((front_repo / "remote-nowhere" / "model.yaml").read_text())["runtime"]["url"]
    reasons = {name: index[name]["state"] + ": " + index[name].get("reason", "") for name in index}
    assert reasons["remote-nowhere"].startswith("UNAVAILABLE") and nowhere in reasons["remote-nowhere"]
    assert "unreachable: connection refused" in reasons["remote-nowhere"]
    assert "404" in reasons["remote-unknown"] and "'lily'" in reasons["remote-unknown"]
    assert "runtime.url" in reasons["remote-ftp"]
    answer = client.post("/v1/models/remote-nowhere:predict", json={"instances": instances(ROWS[:1])})
    assert answer.status_code == 404 and nowhere in answer.json()["error"]


def test_remote_that_never_answers_is_a_504_within_the_timeout(client: httpx.Client, proxies: dict[str, Proxy]) -> None:
    assert client.post("/v1/models/remote-slow:predict", json={"instances": instances(ROWS[:1])}).status_code == 200
    proxies["stalled"].stalled.set()
    done: dict[str, Any] = {}

    def stalled_request() -> None:
        start = time.monotonic()
        done["answer"] = client.post("/v1/models/remote-slow:predict", json={"instances": instances(ROWS[1:2])})
        done["seconds"] = time.monotonic() - start

    waiting = threading.Thread(target=stalled_request)
    waiting.start()
    assert client.get("/v2/health/ready", timeout=2).status_code == 200  # the server is not held up meanwhile
    waiting.join(timeout=30)
    answer = done["answer"]
    assert answer.status_code == 504, answer.text
    assert SLOW_TIMEOUT_MS / 1000 * 0.9 <= done["seconds"] < SLOW_TIMEOUT_MS / 1000 + 3
    message = answer.json()["error"]
    assert proxies["stalled"].url in message and "'iris'" in message and f"timeout_ms ({SLOW_TIMEOUT_MS} ms)" in message


def test_remote_down_is_a_503_naming_it(client: httpx.Client, proxies: dict[str, Proxy]) -> None:
    assert client.post("/v1/models/remote-gone:predict", json={"instances": instances(ROWS[:1])}).status_code == 200
    proxies["gone"].close()
    start = time.monotonic()
    for path, body in [("/v1/models/remote-gone:predict", {"instances": instances(ROWS[:1])}),
                       ("/v2/models/remote-gone/infer",
                        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": ROWS[0]}]})]:  # fmt: skip
        answer = client.post(path, json=body)
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["type"] == "remote_error"
        assert proxies["gone"].url in answer.json()["error"] and "'iris'" in answer.json()["error"]
        assert "unreachable: connection refused" in answer.json()["error"]
    assert time.monotonic() - start < 5


def test_remote_that_drops_the_model_is_a_503(client: httpx.Client, upstream: Server) -> None:
    assert client.post("/v1/models/remote-spare:predict", json={"instances": instances(ROWS[:1])}).status_code == 200
    shutil.rmtree(upstream.repository / "iris-spare")
    deadline = time.monotonic() + 20
    while httpx.get(f"{upstream.url}/v2/models/iris-spare", headers=AUTH).status_code != 404:
        assert time.monotonic() < deadline, "the upstream never unloaded iris-spare"
        time.sleep(0.05)
    answer = client.post("/v1/models/remote-spare:predict", json={"instances": instances(ROWS[:1])})
    assert answer.status_code == 503, answer.text
    assert "'iris-spare'" in answer.json()["error"] and "not served there any more" in answer.json()["error"]


def test_runtime_errors_from_python(upstream: Server) -> None:
    port = free_port()
    with pytest.raises(ModelLoadError, match=rf"127.0.0.1:{port} is unreachable"):
        RemoteRuntime(f"http://127.0.0.1:{port}", "iris")
    rt = RemoteRuntime(upstream.url, "iris", api_key=KEY, timeout_ms=2000)
    with pytest.raises(InvalidInput, match="the remote model rejected the inputs: inputs.input: expected shape"):
        rt.run({"input": np.zeros((1, 5), np.float32)})
    rt.close()
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog) and never answers
    try:
        start = time.monotonic()
        with pytest.raises(ModelLoadError, match=r"did not answer within runtime.timeout_ms \(300 ms\)"):
            RemoteRuntime(f"http://127.0.0.1:{listener.getsockname()[1]}", "iris", timeout_ms=300)
        assert time.monotonic() - start < 3
    finally:
        listener.close()
