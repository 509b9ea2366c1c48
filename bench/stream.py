"""Streaming benchmark: tabular events through Redis Streams with `forwardpass stream` workers.

    python bench/stream.py [--events 50000] [--rate 10000] [--seconds 10]

Needs redis-server (Debian: apt-get install redis-server); one is started on a free loopback port.

- saturation: ``events`` iris readings already in the source stream, one worker (then two, in one
  group) scores them all; events/s = events / (first result to last result).
- latency: a producer offers ``rate`` events/s for ``seconds`` while one worker runs; end-to-end latency
  is the sink entry's id time minus the source entry's id time (both Redis server clock, ms resolution),
  p50 and p99 over the events of the steady part (the first second left out); three rounds, the target
  read on their median p99.

- video: the ResNet-18-shaped CNN of bench/cnn.py behind image pre-processing (JPEG 256x256 -> 224),
  served by `forwardpass serve`; JPEG frames over the WebSocket stream at twice the model's measured
  rate for ``seconds``, with ``?drop=oldest``: frames answered per second, skipped, and the p99 age of an
  answered frame (sent -> answer received), against the model's own time per frame.

- vad: the demo's silero-vad (stateful: the server keeps each stream's recurrent state and last 64
  samples, and detects its speech events) over 60 s of 16 kHz audio: real-time factor (audio seconds per
  compute second) for one stream through ``forwardpass.streaming.vad`` (engine start included), and for
  16 WebSocket streams at once against ``forwardpass serve`` (binary frames of 512 samples, 32 ms), the
  server batching their steps.

Targets (issue 15): >= 20,000 events/s per worker; p99 <= 5 ms at 10,000/s offered; video frame age
p99 under two model runs; VAD real-time factor >= 100 for 16 streams together.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine import cpu_flags  # noqa: E402

IRIS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]


def redis_server(folder: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)  # fmt: skip
    return proc, port


def fill(client, n: int) -> None:
    for start in range(0, n, 1000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            pipe.xadd("readings", {IRIS[0]: 5.1 + i % 3, IRIS[1]: 3.5, IRIS[2]: 1.4 + i % 5, IRIS[3]: 0.2})
        pipe.execute()


def workers(port: int, repo: Path, count: int, batch: int) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "forwardpass", "stream", "iris", "--source", f"redis://127.0.0.1:{port}/readings",
           "--sink", f"redis://127.0.0.1:{port}/scores", "--group", "bench", "--batch-size", str(batch), "-r", str(repo)]
    return [subprocess.Popen([*cmd, "--consumer", f"w{i}"], stdout=subprocess.DEVNULL) for i in range(count)]


def ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


def saturation(client, port: int, repo: Path, n: int, count: int) -> float:
    client.delete("readings", "scores", "scores:done")
    fill(client, n)
    procs = workers(port, repo, count, 512)
    try:
        while client.xlen("scores") < n:
            time.sleep(0.05)
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
    first, last = client.xrange("scores", count=1), client.xrevrange("scores", count=1)
    return n / max((ms(last[0][0]) - ms(first[0][0])) / 1000, 1e-3)


def latency(client, port: int, repo: Path, rate: int, seconds: float) -> tuple[float, float, int]:
    client.delete("readings", "scores", "scores:done")
    procs = workers(port, repo, 1, 256)
    time.sleep(3)  # the worker loads the model and joins the group
    sent = [0]

    def produce() -> None:
        start, per_tick = time.perf_counter(), max(1, rate // 1000)
        tick = 0
        while time.perf_counter() - start < seconds:
            pipe = client.pipeline(transaction=False)
            for _ in range(per_tick):
                pipe.xadd("readings", {IRIS[0]: 5.1, IRIS[1]: 3.5, IRIS[2]: 1.4, IRIS[3]: 0.2})
            pipe.execute()
            sent[0] += per_tick
            tick += 1
            delay = start + tick / 1000 - time.perf_counter()
            if delay > 0:
                time.sleep(delay)

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join()
    deadline = time.monotonic() + 30
    while client.xlen("scores") < sent[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        p.terminate()
        p.wait(30)
    entries = client.xrange("scores")
    begin = ms(entries[0][0]) + 1000
    lat = [ms(i) - int(f[b"source_id"].split(b"-")[0]) for i, f in entries if ms(i) > begin]
    lat.sort()
    return statistics.median(lat), lat[int(0.99 * (len(lat) - 1))], len(entries)


def video(tmp: Path, seconds: float) -> None:
    import io
    import json

    import numpy as np
    import yaml
    from cnn import write as write_cnn
    from PIL import Image
    from serve import Proc
    from websockets.sync.client import connect

    repo = tmp / "video"
    write_cnn(repo / "cnn" / "1" / "model.onnx")
    (repo / "cnn" / "model.yaml").write_text(yaml.safe_dump({
        "task": "custom", "post": {"kind": "passthrough"}, "cache": {"enabled": False},
        "pre": {"kind": "image", "color": "RGB", "resize": 224, "center_crop": [224, 224], "scale": 1 / 255,
                "layout": "NCHW"}}))  # fmt: skip
    server = Proc("fp", [sys.executable, "-m", "forwardpass", "serve", str(repo), "--port", "{port}",
                         "--poll-interval", "0", "--log-level", "warning"], "/v2/health/ready")  # fmt: skip
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(8):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), np.uint8)).save(out, format="JPEG")
        jpegs.append(out.getvalue())

    def frame(i: int) -> bytes:
        data = jpegs[i % len(jpegs)]
        tensor = len(data).to_bytes(4, "little") + data
        head = json.dumps({"id": str(i), "inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                                     "parameters": {"binary_data_size": len(tensor)}}]}).encode()  # fmt: skip
        return len(head).to_bytes(4, "little") + head + tensor

    try:
        url = f"ws://127.0.0.1:{server.port}/v2/models/cnn/stream"
        with connect(url) as ws:  # the model's own time per frame, one at a time
            for i in range(3):
                ws.send(frame(i))
                ws.recv()
            start = time.perf_counter()
            for i in range(10):
                ws.send(frame(i))
                ws.recv()
            per_frame = (time.perf_counter() - start) / 10
        interval = per_frame / 2
        sent: dict[str, float] = {}
        with connect(url + "?drop=oldest", max_size=None) as ws:
            def send() -> None:
                i, end = 0, time.perf_counter() + seconds
                while time.perf_counter() < end:
                    sent[str(i)] = time.perf_counter()
                    ws.send(frame(i))
                    i += 1
                    time.sleep(interval)

            sender = threading.Thread(target=send)
            started = time.perf_counter()
            sender.start()
            ages, skipped = [], 0
            while sender.is_alive() or len(ages) + skipped < len(sent):
                try:
                    message = ws.recv(timeout=5)
                except TimeoutError:
                    break
                if isinstance(message, bytes):  # binary outputs: the JSON header's length, the header, the tensors
                    message = message[4 : 4 + int.from_bytes(message[:4], "little")]
                doc = json.loads(message)
                ages.append(time.perf_counter() - sent[doc["id"]])
                skipped += doc.get("parameters", {}).get("skipped", 0)
            elapsed = time.perf_counter() - started
            sender.join()
    finally:
        server.stop()
    ages.sort()
    p99 = ages[int(0.99 * (len(ages) - 1))]
    print(f"video: model {per_frame * 1e3:.0f} ms/frame alone; {len(sent)} frames offered at 2x its rate for "
          f"{seconds:g} s with drop=oldest: {len(ages) / elapsed:.1f} answered/s, {skipped} skipped, frame age "
          f"p50 {ages[len(ages) // 2] * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms = {p99 / per_frame:.2f} model runs "
          f"(target < 2) -> {'met' if p99 < 2 * per_frame else 'MISSED'}")


def vad_rtf(tmp: Path, demo_repo: Path, streams: int = 16) -> None:
    import json

    import numpy as np
    from serve import Proc
    from websockets.sync.client import connect

    from forwardpass.pipeline.audio import encode_wav
    from forwardpass.repository import Repository
    from forwardpass.streaming import vad

    if not (demo_repo / "silero-vad").is_dir():
        print("vad: silero-vad is not installed, skipped")
        return
    repo = tmp / "vad"
    shutil.copytree(demo_repo / "silero-vad", repo / "silero-vad")
    rng = np.random.default_rng(0)
    burst = np.concatenate([rng.standard_normal(16000).astype(np.float32) * 0.3, np.zeros(16000, np.float32)])
    path = tmp / "vad60.wav"
    path.write_bytes(encode_wav(np.tile(burst, 30), 16000))
    start = time.perf_counter()
    vad.file_segments(Repository(repo), "silero-vad", path)
    one = 60 / (time.perf_counter() - start)
    chunks, _ = vad.windows(path)
    frames = []
    for c in chunks:
        data = np.ascontiguousarray(c, np.float32).reshape(1, -1)
        head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(data.shape),
                                       "parameters": {"binary_data_size": data.nbytes}}]}).encode()  # fmt: skip
        frames.append(len(head).to_bytes(4, "little") + head + data.tobytes())
    server = Proc("fp", [sys.executable, "-m", "forwardpass", "serve", str(repo), "--port", "{port}",
                         "--poll-interval", "0", "--log-level", "warning"], "/v2/health/ready")  # fmt: skip

    def stream(_: int) -> None:
        with connect(f"ws://127.0.0.1:{server.port}/v2/models/silero-vad/stream", max_size=None) as ws:
            receiver = threading.Thread(target=lambda: [ws.recv(timeout=300) for _ in frames])
            receiver.start()
            for f in frames:
                ws.send(f)
            receiver.join()

    from concurrent.futures import ThreadPoolExecutor

    try:
        stream(0)  # warm
        start = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(stream, range(streams)))
        many = streams * 60 / (time.perf_counter() - start)
    finally:
        server.stop()
    print(f"vad: real-time factor, 1 stream (file, engine start included) {one:.0f}; {streams} WebSocket streams "
          f"together {many:.0f} (target >= 100) -> {'met' if many >= 100 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    import redis

    from forwardpass import demo

    if shutil.which("redis-server") is None:
        sys.exit("needs redis-server (apt-get install redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="fp-stream-"))
    repo = tmp / "models"
    repo.mkdir()
    shutil.copytree(demo.repository() / "iris", repo / "iris")
    proc, port = redis_server(tmp)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    print(f"CPU: {cpu_flags()}, {os.cpu_count()} cores; iris readings through Redis Streams\n")
    try:
        one = saturation(client, port, repo, args.events, 1)
        two = saturation(client, port, repo, args.events, 2)
        print(f"saturation, {args.events:,} events: 1 worker {one:,.0f} events/s, 2 workers {two:,.0f} events/s")
        rounds = []
        for _ in range(3):  # the tail is noisy on a small machine (producer, redis-server, worker share it)
            rounds.append(latency(client, port, repo, args.rate, args.seconds))
            p50, p99, n = rounds[-1]
            print(f"offered {args.rate:,}/s for {args.seconds:g} s ({n:,} scored): end-to-end p50 {p50:.0f} ms, "
                  f"p99 {p99:.0f} ms")  # fmt: skip
        p99 = statistics.median(r[1] for r in rounds)
        print(f"median of {len(rounds)} rounds: p99 {p99:.0f} ms")
        print(f"\ntargets: >= 20,000 events/s per worker: {one:,.0f} -> {'met' if one >= 20_000 else 'MISSED'}; "
              f"p99 <= 5 ms at 10,000/s: {p99:.0f} ms -> {'met' if p99 <= 5 else 'MISSED'}\n")
        video(tmp, args.seconds)
        vad_rtf(tmp, demo.repository())
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
