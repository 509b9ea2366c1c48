"""WebSocket streams (/v2/models/{model}/stream) on both HTTP stacks: answers in order through the engine,
one sequence per connection for a stateful model (freed when it closes), close codes for bad frames, drop=oldest
for a feed that outruns the model, API keys, many connections at once."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from fixtures import fake_model, gate, save
from fixtures.inprocess import SocketServer
from test_sequences import SEQUENCE, _accumulator  # noqa: E402  (the accumulator model)
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from forwardpass.server.config import ServeConfig


def frame(value: float, name: str = "input", width: int = 4) -> str:
    return json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": [1, width], "data": [value] * width}]})


def acc_frame(value: int) -> str:
    return json.dumps({"inputs": [{"name": "INPUT", "datatype": "INT32", "shape": [1, 1], "data": [value]}]})


def output(message: str | bytes, name: str) -> list:
    doc = json.loads(message)
    assert "outputs" in doc, doc
    return next(o["data"] for o in doc["outputs"] if o["name"] == name)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    fake_model(tmp_path, "echo", runtime={"kind": "echo", "scale": 2.0})
    fake_model(tmp_path, "held", runtime={"kind": "slow", "gate": "ws-held"})
    folder = tmp_path / "acc"
    folder.mkdir()
    (folder / "model.yaml").write_text(yaml.safe_dump({"task": "custom", "sequence": SEQUENCE}))
    save(_accumulator(), folder / "1" / "model.onnx")
    return tmp_path


class Uvicorn:
    """The ASGI app on uvicorn in a thread of this process (the other HTTP stack)."""

    def __init__(self, config: ServeConfig):
        import uvicorn

        from forwardpass.server.app import create_app

        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), lifespan="on", log_level="warning",
                                                    ws="websockets-sansio"))  # fmt: skip
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return
            threading.Event().wait(0.01)
        raise TimeoutError("uvicorn did not start")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self) -> Uvicorn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(params=["own", "uvicorn"])
def server(request, repo) -> Iterator[tuple[str, Path]]:
    config = ServeConfig(repository=repo, poll_interval=0)
    if request.param == "own":
        with SocketServer(config) as own:
            yield f"ws://127.0.0.1:{own.port}", repo
    else:
        served = Uvicorn(config)
        try:
            yield f"ws://127.0.0.1:{served.port}", repo
        finally:
            served.close()


def test_answers_come_back_in_order_through_the_engine(server):
    url, _ = server
    with connect(f"{url}/v2/models/echo/stream") as ws:
        for i in range(20):
            ws.send(frame(i))
        answers = [output(ws.recv(timeout=10), "output") for _ in range(20)]
    assert answers == [[2.0 * i] * 4 for i in range(20)]


def test_a_connection_is_one_sequence_of_a_stateful_model_and_its_state_goes_with_it(server):
    url, _ = server
    with connect(f"{url}/v2/models/acc/stream") as a, connect(f"{url}/v2/models/acc/stream") as b:
        for value in (1, 2, 3):
            a.send(acc_frame(value))
            b.send(acc_frame(10 * value))
        assert [output(a.recv(timeout=10), "OUTPUT")[0] for _ in range(3)] == [1, 3, 6]
        assert [output(b.recv(timeout=10), "OUTPUT")[0] for _ in range(3)] == [10, 30, 60]
        # a V2 client naming the integer the stream's model sees as its CORRID starts a sequence of its own
        import httpx

        a.send(acc_frame(0))
        corrid = output(a.recv(timeout=10), "ID")[0]
        body = {"inputs": [{"name": "INPUT", "datatype": "INT32", "shape": [1, 1], "data": [100]}],
                "parameters": {"sequence_id": corrid, "sequence_start": True, "sequence_end": True}}  # fmt: skip
        v2 = httpx.post("http" + url.removeprefix("ws") + "/v2/models/acc/infer", json=body, timeout=10)
        assert output(v2.text, "OUTPUT") == [100]
        a.send(acc_frame(4))
        assert output(a.recv(timeout=10), "OUTPUT") == [10]  # the stream's own sum went on untouched
    with connect(f"{url}/v2/models/acc/stream") as c:  # a new connection starts from the initial state
        c.send(acc_frame(5))
        assert output(c.recv(timeout=10), "OUTPUT") == [5]
    # every connection closed: its sequence's state is freed (the gauge counts none)
    import httpx

    metrics = "http" + url.removeprefix("ws") + "/metrics"
    deadline = threading.Event()
    for _ in range(200):
        if 'forwardpass_sequences_live{model="acc",version="1"} 0.0' in httpx.get(metrics, timeout=10).text:
            break
        deadline.wait(0.02)
    else:
        raise AssertionError("the closed connections' states were not freed")


def test_a_frame_that_is_not_a_v2_request_closes_with_1007_and_the_reason(server):
    url, _ = server
    with connect(f"{url}/v2/models/echo/stream") as ws:
        ws.send(frame(1))
        assert output(ws.recv(timeout=10), "output") == [2.0] * 4
        ws.send("{not json")
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1007 and "JSON" in closed.value.rcvd.reason


def test_a_frame_the_model_refuses_is_answered_with_its_error_and_the_stream_goes_on(server):
    url, _ = server
    with connect(f"{url}/v2/models/echo/stream") as ws:
        ws.send(frame(1, width=3))  # the model takes [N, 4]
        refused = json.loads(ws.recv(timeout=10))
        assert refused["type"] == "invalid_input" and refused["detail"][0]["loc"][:2] == ["inputs", "input"]
        ws.send(frame(2))
        assert output(ws.recv(timeout=10), "output") == [4.0] * 4


def test_an_unknown_model_is_refused_before_the_stream_opens(server):
    url, _ = server
    with pytest.raises((InvalidStatus, ConnectionClosedError)):
        with connect(f"{url}/v2/models/nope/stream") as ws:
            ws.recv(timeout=10)


def test_drop_oldest_keeps_the_newest_frame_and_says_how_many_it_skipped(server):
    url, _ = server
    held = gate("ws-held")
    with connect(f"{url}/v2/models/held/stream?drop=oldest") as ws:
        with held.closed():
            before = held.inside
            ws.send(frame(0))
            held.wait_inside(before + 1)  # frame 0 is in the forward pass
            for i in range(1, 6):
                ws.send(frame(i))
            ws.ping().wait(10)  # the server has read every frame before the gate opens
        first = json.loads(ws.recv(timeout=10))
        newest = json.loads(ws.recv(timeout=10))
    assert output(json.dumps(first), "output") == [0.0] * 4
    assert output(json.dumps(newest), "output") == [5.0] * 4 and newest["parameters"]["skipped"] == 4


def test_many_connections_at_once_each_get_their_own_answers(server):
    url, _ = server

    def one(k: int) -> list:
        with connect(f"{url}/v2/models/echo/stream") as ws:
            for i in range(5):
                ws.send(frame(100 * k + i))
            return [output(ws.recv(timeout=30), "output")[0] for _ in range(5)]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert results == [[2.0 * (100 * k + i) for i in range(5)] for k in range(16)]


def test_streams_need_the_api_key_as_every_inference_route(repo, tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    with SocketServer(ServeConfig(repository=repo, poll_interval=0, api_key_file=key)) as own:
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{own.port}/v2/models/echo/stream")
        assert refused.value.response.status_code == 401
        with connect(f"ws://127.0.0.1:{own.port}/v2/models/echo/stream",
                     additional_headers={"Authorization": "Bearer s3cret"}) as ws:  # fmt: skip
            ws.send(frame(1))
            assert output(ws.recv(timeout=10), "output") == [2.0] * 4


@pytest.mark.parametrize("stack", ["own", "uvicorn"])
def test_a_browser_sends_its_key_as_a_subprotocol_and_gets_ours_back(repo, tmp_path, stack):
    """A browser's WebSocket can send no header: the dashboard offers ["forwardpass", "bearer.<key>"]."""
    key = tmp_path / "key"
    key.write_text("s3/cr+t=\n")  # not an HTTP token: the subprotocol carries it in base64url
    config = ServeConfig(repository=repo, poll_interval=0, api_key_file=key)
    with SocketServer(config) if stack == "own" else Uvicorn(config) as own:
        url = f"ws://127.0.0.1:{own.port}/v2/models/echo/stream"
        with pytest.raises(InvalidStatus) as refused:
            connect(url, subprotocols=["forwardpass", "bearer.wrong"])
        assert refused.value.response.status_code == (401 if stack == "own" else 403)  # ASGI's refusal is a 403
        encoded = base64.urlsafe_b64encode(b"s3/cr+t=").decode().rstrip("=")
        with connect(url, subprotocols=["forwardpass", f"bearer.{encoded}"]) as ws:
            assert ws.subprotocol == "forwardpass"  # the key is never echoed back
            ws.send(frame(1))
            assert output(ws.recv(timeout=10), "output") == [2.0] * 4


def test_binary_frames_carry_v2_binary_tensors(server):
    url, _ = server
    data = np.arange(4, dtype=np.float32)
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                   "parameters": {"binary_data_size": 16}}],
                       "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
    with connect(f"{url}/v2/models/echo/stream") as ws:
        ws.send(len(head).to_bytes(4, "little") + head + data.tobytes())
        answer = ws.recv(timeout=10)
    assert isinstance(answer, bytes)
    length = int.from_bytes(answer[:4], "little")
    meta = json.loads(answer[4 : 4 + length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 16
    np.testing.assert_array_equal(np.frombuffer(answer[4 + length :], np.float32), data * 2)


def _jpeg(value: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((32, 32), value % 256, np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _video_frame(index: int, jpeg: bytes) -> bytes:
    """A binary frame: one BYTES input carrying the JPEG (V2 binary: 4-byte length, then the bytes)."""
    tensor = len(jpeg).to_bytes(4, "little") + jpeg
    head = json.dumps({"id": str(index), "inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                                     "parameters": {"binary_data_size": len(tensor)}}]}).encode()  # fmt: skip
    return len(head).to_bytes(4, "little") + head + tensor


def test_video_frames_faster_than_the_model_keep_their_age_bounded_with_drop_oldest(tmp_path):
    """JPEG frames at about 5x what an image model (a 40 ms forward pass behind image pre-processing) runs:
    with drop=oldest every answered frame is young (under a few model runs), the skipped ones are counted."""
    import time

    fake_model(tmp_path, "camera", runtime={"kind": "slow", "delay_s": 0.04,
                                            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                                            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}]},
               pre={"kind": "image", "color": "L", "resize": [8, 8], "layout": "flat"})  # fmt: skip
    frames = [_video_frame(i, _jpeg(i)) for i in range(100)]
    sent: dict[str, float] = {}
    with SocketServer(ServeConfig(repository=tmp_path, poll_interval=0)) as own:
        with connect(f"ws://127.0.0.1:{own.port}/v2/models/camera/stream?drop=oldest") as ws:
            def send() -> None:
                for i, data in enumerate(frames):
                    sent[str(i)] = time.monotonic()
                    ws.send(data)
                    time.sleep(0.008)  # ~125 frames/s against ~25 forward passes/s

            sender = threading.Thread(target=send)
            sender.start()
            ages, skipped, answered = [], 0, 0
            while True:
                try:
                    message = ws.recv(timeout=2)
                except TimeoutError:
                    break
                length = int.from_bytes(message[:4], "little") if isinstance(message, bytes) else None
                doc = json.loads(message[4 : 4 + length] if length is not None else message)
                assert "outputs" in doc, doc
                ages.append(time.monotonic() - sent[doc["id"]])
                skipped += doc.get("parameters", {}).get("skipped", 0)
                answered += 1
                if doc["id"] == "99":
                    break
            sender.join()
    assert answered + skipped == 100  # every frame answered or counted as skipped, none lost silently
    assert skipped > 30 and answered < 70
    ages.sort()
    assert ages[int(0.99 * (len(ages) - 1))] < 0.5, ages[-5:]  # without dropping, the last frames would wait ~3 s
