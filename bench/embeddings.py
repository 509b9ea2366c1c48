"""Embeddings per second through POST /v1/embeddings against `forwardpass serve`, at batch 1 and batch 32.

    python bench/embeddings.py [--seconds 5] [--concurrency 4] [--model smollm2-embed]

Serves the demo's smollm2-embed (a copy of that one model folder) in a `forwardpass serve` process on
loopback; clients are threads with one httpx connection each, sending short sentences (8-14 tokens) as one
input (batch 1) or a list of 32 inputs (batch 32), float encoding. Beside each rate: the same texts through
the model in this process (Model.predict, no HTTP), so the ratio shows what the server costs. Bounded:
``--seconds`` a point, start-up waits at most 120 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

SENTENCES = [
    "A man is playing a guitar on the street.", "The cat sleeps on the sofa all afternoon.",
    "How do I reset my password for this account?", "The stock market fell sharply today.",
    "She is cooking pasta in the kitchen tonight.", "The train to London leaves at noon.",
    "Children are playing football in the park.", "The museum opens at nine in the morning.",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(repo: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "forwardpass", "serve", "-r", str(repo), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("forwardpass serve exited before it was ready")
        time.sleep(0.1)  # polling a subprocess's readiness, bounded by the deadline
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("forwardpass serve was not ready within 120 s")


def _rate(url: str, model: str, batch: int, seconds: float, concurrency: int) -> float:
    inputs = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    body = {"model": model, "input": inputs[0] if batch == 1 else inputs, "encoding_format": "float"}
    done = [0] * concurrency
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < stop:
                http.post(f"{url}/v1/embeddings", json=body).raise_for_status()
                done[i] += batch

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - start)


def _in_process(repo: Path, model: str, batch: int, seconds: float) -> float:
    import forwardpass

    m = forwardpass.load(model, repository=repo)
    inputs = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    n, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        m.predict(inputs)
        n += batch
    return n / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--model", default="smollm2-embed")
    args = parser.parse_args()
    from forwardpass import demo

    source = demo.repository(progress=lambda line: print(f"building the demo: {line}", file=sys.stderr))
    if not (source / args.model).is_dir():
        raise SystemExit(f"{args.model} is not in the demo repository: {demo.left_out()}")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        shutil.copytree(source / args.model, repo / args.model)
        port = _free_port()
        proc = _serve(repo, port)
        try:
            url = f"http://127.0.0.1:{port}"
            for batch in (1, 32):
                served = _rate(url, args.model, batch, args.seconds, args.concurrency)
                local = _in_process(repo, args.model, batch, args.seconds)
                print(f"batch {batch:>2}: {served:8.1f} embeddings/s over /v1/embeddings (concurrency "
                      f"{args.concurrency}); in process {local:8.1f}/s; ratio {served / local:.2f}")  # fmt: skip
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    main()
