"""Serving benchmark on loopback: forwardpass against a plain FastAPI server and raw ONNX Runtime.

    python bench/serve.py [--rounds 3] [--duration 5] [--soak 300]

Needs wrk (Debian: apt-get install wrk) and fastapi (the baseline). wrk runs pinned to the last
core (taskset); servers are not pinned. Every point is the median of interleaved rounds.

- digits, one row per request as V2 JSON (417 B): requests/s, p50 and p99 at concurrency 1, 16,
  64 for forwardpass (1 and 2 workers, and on uvicorn for reference) and the plain baseline
  (FastAPI + uvicorn, sync handler, one session.run per request).
- a ResNet-18-shaped CNN (3x224x224, random weights) as V2 binary tensors: images/s against raw
  in-process ONNX Runtime at its best batch size, and the baseline.
- start-up to ready and idle PSS of `forwardpass serve` on the demo repository.
- with --soak S: server RSS sampled every 5 s over S seconds of digits at concurrency 64.
- with --tenancy: only the cost of keys, rate limits, metering and drift sampling (issue 19): digits at
  c=1 and c=64, 1 and 2 workers, all of them off (drift disabled in model.yaml) against a keyed request
  (a tier whose limits never refuse, so every check runs) with metering and drift on; the microseconds
  added per request, from the latency at c=1.

Targets (issue 4): digits c=64 >= 8x baseline with p99 no worse, c=1 >= 3x; CNN c=64 >= 0.85x
raw; RSS flat within 10% over the soak; start-up <= 2 s; idle PSS <= 200 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cnn import write as write_cnn  # noqa: E402
from engine import cpu_flags  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server process, ready when its health URL answers 200."""

    def __init__(self, name: str, cmd: list[str], ready_path: str, env: dict[str, str] | None = None):
        self.name, self.port = name, free_port()
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.url = f"http://127.0.0.1:{self.port}"
        start = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)  # fmt: skip
        self.ready_s = self._wait(ready_path, start)

    def _wait(self, path: str, start: float) -> float:
        while time.monotonic() - start < 120:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise TimeoutError(self.name)

    def pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        return [self.proc.pid, *map(int, out)]

    def memory_kib(self, field: str) -> int:
        total = 0
        for pid in self.pids():
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            total += int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))
        return total

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wrk(url: str, script: Path, connections: int, seconds: float, timeout: str = "10s") -> dict[str, float]:
    cores = os.cpu_count() or 1
    pin = ["taskset", "-c", str(cores - 1)] if cores > 1 and shutil.which("taskset") else []
    cmd = [*pin, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", f"--timeout={timeout}", "-s",
           str(script), url]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def latency(pct: str) -> float:
        value, unit = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", out, re.M).groups()
        return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]

    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": latency("50"),
        "p99": latency("99"),
        "failed": (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0),
    }


def lua(path: Path, body_file: Path, headers: dict[str, str]) -> Path:
    lines = ['wrk.method = "POST"'] + [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    lines += [f'local f = io.open("{body_file}", "rb")', "wrk.body = f:read('*all')", "f:close()"]
    path.write_text("\n".join(lines) + "\n")
    return path


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def build_repository(root: Path, demo: Path) -> Path:
    repo = root / "models"
    shutil.copytree(demo / "digits", repo / "digits")
    config = yaml.safe_load((repo / "digits" / "model.yaml").read_text())
    config["cache"] = {"enabled": False}  # identical requests must reach the model
    (repo / "digits" / "model.yaml").write_text(yaml.safe_dump(config))
    write_cnn(repo / "cnn" / "1" / "model.onnx")
    (repo / "cnn" / "model.yaml").write_text(yaml.safe_dump({
        "task": "custom", "description": "ResNet-18-shaped, random weights",
        "batching": {"max_batch_size": 8}, "post": {"kind": "passthrough"},
    }))  # fmt: skip
    return repo


def raw_cnn(path: Path, seconds: float) -> tuple[int, float]:
    """Raw ONNX Runtime in this process: (best batch size, images/s)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    best = (1, 0.0)
    for batch in (1, 2, 4, 8):
        x = np.random.default_rng(0).random((batch, 3, 224, 224), np.float32)
        session.run(None, {"input": x})
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            session.run(None, {"input": x})
            n += 1
        rate = n * batch / (time.perf_counter() - start)
        best = max(best, (batch, rate), key=lambda b: b[1])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk point")
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of c=64 load while sampling RSS")
    parser.add_argument("--tenancy", action="store_true", help="only: what keys + limits + metering cost")
    args = parser.parse_args()
    from forwardpass import demo

    demo_repo = demo.repository()
    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    repo = build_repository(tmp, demo_repo)
    x = [float(i % 17) for i in range(64)]
    digits_body = tmp / "digits.json"
    digits_body.write_bytes(json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x}]}).encode())
    digits_lua = lua(tmp / "digits.lua", digits_body, {"Content-Type": "application/json"})
    image = np.random.default_rng(1).random((1, 3, 224, 224), np.float32)
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 224, 224], "datatype": "FP32",
                                   "parameters": {"binary_data_size": image.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
    cnn_body = tmp / "cnn.bin"
    cnn_body.write_bytes(head + image.tobytes())
    cnn_lua = lua(tmp / "cnn.lua", cnn_body, {"Inference-Header-Content-Length": str(len(head))})

    print(f"CPU: {cpu_flags()}, {os.cpu_count()} cores; wrk -t1 pinned to the last core; medians of {args.rounds} "
          f"interleaved rounds of {args.duration:g} s\n")  # fmt: skip
    if args.tenancy:
        tenancy(tmp, repo, digits_body, args.rounds, args.duration)
        return
    fp = [sys.executable, "-m", "forwardpass", "serve", str(repo), "--port", "{port}", "--poll-interval", "0",
          "--log-level", "warning"]  # fmt: skip
    baseline = [sys.executable, str(HERE / "baseline_fastapi.py")]
    servers = {
        "forwardpass, 2 workers": Proc("fp2", [*fp, "--workers", "2"], "/v2/health/ready"),
        "forwardpass, 1 worker": Proc("fp1", fp, "/v2/health/ready"),
        "forwardpass on uvicorn": Proc("fpu", [*fp, "--http", "uvicorn"], "/v2/health/ready"),
        "plain FastAPI": Proc("fastapi", [*baseline, str(repo / "digits" / "1" / "model.onnx"), "{port}"], "/ready"),
    }
    try:
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for name, server in servers.items():
                for c in (1, 16, 64):
                    results.setdefault((name, c), []).append(
                        wrk(f"{server.url}/v2/models/digits/infer", digits_lua, c, args.duration))
        print("digits, one row per request (V2 JSON)")
        print(f"{'server':<26}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}{'x baseline':>12}")
        table = {k: medians(v) for k, v in results.items()}
        for (name, c), r in table.items():
            ratio = r["rps"] / table[("plain FastAPI", c)]["rps"]
            print(f"{name:<26}{c:>4}{r['rps']:>10.0f}{r['p50'] * 1e3:>9.2f}{r['p99'] * 1e3:>9.2f}{r['failed']:>8.0f}{ratio:>12.2f}")
        best = "forwardpass, 2 workers"
        c64, c1 = table[(best, 64)], table[(best, 1)]
        base64, base1 = table[("plain FastAPI", 64)], table[("plain FastAPI", 1)]
        print(f"\ntarget c=64 >= 8x baseline, p99 no worse: {c64['rps'] / base64['rps']:.1f}x, p99 {c64['p99'] * 1e3:.1f} "
              f"vs {base64['p99'] * 1e3:.1f} ms -> {'met' if c64['rps'] >= 8 * base64['rps'] and c64['p99'] <= base64['p99'] else 'MISSED'}")
        print(f"target c=1 >= 3x baseline: {c1['rps'] / base1['rps']:.1f}x -> {'met' if c1['rps'] >= 3 * base1['rps'] else 'MISSED'}")
    finally:
        for name in ("forwardpass, 2 workers", "forwardpass on uvicorn", "plain FastAPI"):
            servers.pop(name).stop()

    # the CNN: one forwardpass worker (its session already uses every core), the baseline, raw ORT
    servers["plain FastAPI"] = Proc("fastapi-cnn", [*baseline, str(repo / "cnn" / "1" / "model.onnx"), "{port}"], "/ready")
    try:
        batch, raw_rate = raw_cnn(repo / "cnn" / "1" / "model.onnx", max(3.0, args.duration))
        cnn: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for c in (1, 16, 64):
                cnn.setdefault(("forwardpass, 1 worker", c), []).append(
                    wrk(f"{servers['forwardpass, 1 worker'].url}/v2/models/cnn/infer", cnn_lua, c, 2 * args.duration, "60s"))
            cnn.setdefault(("plain FastAPI", 64), []).append(
                wrk(f"{servers['plain FastAPI'].url}/binary/cnn/infer", cnn_lua, 64, 2 * args.duration, "60s"))
        print(f"\nResNet-18-shaped CNN, 3x224x224 (V2 binary tensors); raw ONNX Runtime in-process: {raw_rate:.1f} images/s "
              f"at batch {batch}")
        print(f"{'server':<26}{'c':>4}{'img/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}{'x raw':>8}")
        for (name, c), rows in cnn.items():
            r = medians(rows)
            print(f"{name:<26}{c:>4}{r['rps']:>10.1f}{r['p50'] * 1e3:>9.0f}{r['p99'] * 1e3:>9.0f}{r['failed']:>8.0f}{r['rps'] / raw_rate:>8.2f}")
        fp64 = medians(cnn[("forwardpass, 1 worker", 64)])["rps"]
        print(f"\ntarget CNN c=64 >= 0.85x raw: {fp64 / raw_rate:.2f}x -> {'met' if fp64 >= 0.85 * raw_rate else 'MISSED'}")

        if args.soak > 0:
            server = servers["forwardpass, 1 worker"]
            samples = []
            load = subprocess.Popen(["wrk", "-t1", "-c64", f"-d{max(1, round(args.soak))}s", "-s", str(digits_lua),
                                     f"{server.url}/v2/models/digits/infer"], stdout=subprocess.DEVNULL)  # fmt: skip
            start = time.monotonic()
            while load.poll() is None:
                samples.append((time.monotonic() - start, server.memory_kib("Rss") / 1024))
                time.sleep(5)
            steady = [m for t, m in samples if t >= 10]  # after warm-up
            drift = (max(steady) - steady[0]) / steady[0] if steady else float("nan")
            print(f"\nsoak: {args.soak:.0f} s at c=64, RSS MiB every 5 s: {[round(m) for _, m in samples]}")
            print(f"target RSS flat within 10%: max drift {drift:+.1%} from {steady[0]:.0f} MiB -> "
                  f"{'met' if drift <= 0.10 else 'MISSED'}")
    finally:
        for server in servers.values():
            server.stop()

    # start-up and idle memory on the built-in demo repository
    starts, pss = [], []
    for _ in range(3):
        server = Proc("demo", [sys.executable, "-m", "forwardpass", "serve", "--port", "{port}", "--log-level",
                               "warning"], "/v2/health/ready")  # fmt: skip
        starts.append(server.ready_s)
        time.sleep(1)
        pss.append(server.memory_kib("Pss") / 1024)
        server.stop()
    print(f"\nstart-up to ready (demo repository, {len(os.listdir(demo_repo)) - 1} models): "
          f"{statistics.median(starts):.2f} s (runs {[round(s, 2) for s in starts]}); target <= 2 s -> "
          f"{'met' if statistics.median(starts) <= 2 else 'MISSED'}")
    print(f"idle PSS: {statistics.median(pss):.0f} MiB; target <= 200 MiB -> {'met' if statistics.median(pss) <= 200 else 'MISSED'}")
    shutil.rmtree(tmp, ignore_errors=True)


def tenancy(tmp: Path, repo: Path, body: Path, rounds: int, duration: float) -> None:
    """Keys + limits + metering against none of them, same run, interleaved (issue 19's hot-path cost)."""
    from forwardpass.monitoring.keys import Tiers, create_key

    tiers_file = tmp / "tiers.yaml"
    tiers_file.write_text("tiers:\n  bench: {requests_per_second: 1.0e9, burst: 1000000000, rows_per_minute: "
                          "1000000000000, monthly_requests: 1000000000000}\n")  # fmt: skip
    secret, _ = create_key(tmp / "keys.yaml", "bench", key_id="bench", tiers=Tiers.load(tiers_file))
    keyed_lua = lua(tmp / "keyed.lua", body, {"Content-Type": "application/json", "Authorization": f"Bearer {secret}"})
    plain_lua = lua(tmp / "plain.lua", body, {"Content-Type": "application/json"})
    plain = tmp / "models-no-drift"  # "off" is the server without any of issue 19: no drift sampling either
    shutil.copytree(repo / "digits", plain / "digits")
    config = yaml.safe_load((plain / "digits" / "model.yaml").read_text())
    config["drift"] = {"enabled": False}
    (plain / "digits" / "model.yaml").write_text(yaml.safe_dump(config))
    fp = [sys.executable, "-m", "forwardpass", "serve", "{repo}", "--port", "{port}", "--poll-interval", "0",
          "--log-level", "warning"]  # fmt: skip
    off = {"FORWARDPASS_METERING": "false", "FORWARDPASS_STATE_DIR": str(tmp / "state-off")}
    on = {"FORWARDPASS_KEYS_FILE": str(tmp / "keys.yaml"), "FORWARDPASS_TIERS_FILE": str(tiers_file),
          "FORWARDPASS_REQUIRE_API_KEY": "true", "FORWARDPASS_STATE_DIR": str(tmp / "state-on")}  # fmt: skip
    served = {False: [a.replace("{repo}", str(plain)) for a in fp], True: [a.replace("{repo}", str(repo)) for a in fp]}
    servers = {}
    for workers in (1, 2):
        w = ["--workers", str(workers)]
        servers[f"{workers} worker(s), off"] = (Proc(f"off{workers}", [*served[False], *w], "/v2/health/ready", off),
                                                plain_lua)  # fmt: skip
        servers[f"{workers} worker(s), on"] = (Proc(f"on{workers}", [*served[True], *w], "/v2/health/ready", on),
                                               keyed_lua)  # fmt: skip
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for _ in range(rounds):
            for name, (server, script) in servers.items():
                for c in (1, 64):
                    results.setdefault((name, c), []).append(wrk(f"{server.url}/v2/models/digits/infer", script, c, duration))
        usage = httpx.get(f"{servers['1 worker(s), on'][0].url}/v1/usage", headers={"Authorization": f"Bearer {secret}"})
    finally:
        for server, _ in servers.values():
            server.stop()
    table = {k: medians(v) for k, v in results.items()}
    print("digits, one row per request (V2 JSON): keys, rate limits and metering off vs on")
    print(f"{'server':<24}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}{'x off':>8}")
    for (name, c), r in table.items():
        base = table[(name.replace(", on", ", off"), c)]
        print(f"{name:<24}{c:>4}{r['rps']:>10.0f}{r['p50'] * 1e3:>9.3f}{r['p99'] * 1e3:>9.2f}{r['failed']:>8.0f}"
              f"{r['rps'] / base['rps']:>8.2f}")  # fmt: skip
    for workers in (1, 2):
        for c in (1, 64):
            on1, off1 = table[(f"{workers} worker(s), on", c)], table[(f"{workers} worker(s), off", c)]
            added = (1 / on1["rps"] - 1 / off1["rps"]) * 1e6
            print(f"{workers} worker(s), c={c}: added per request (1/rps on - off): {added:.1f} us; target <= 50 us "
                  f"-> {'met' if added <= 50 else 'MISSED'}")  # fmt: skip
    print(f"metered by the keyed 1-worker server: {usage.json()['totals']['requests']} requests")


if __name__ == "__main__":
    main()
