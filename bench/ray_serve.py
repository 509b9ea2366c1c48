"""forwardpass serve --ray against forwardpass serve alone: digits, one row per request (V2 JSON).

    python bench/ray_serve.py [--rounds 3] [--duration 5]

Needs wrk and ray[serve]. One plain server for the whole run; a Ray Serve deployment of digits with 1 replica,
then with 2 (model.yaml scale: min = max), each measured in rounds interleaved with the plain server, at
concurrency 1 and 16. Prints req/s, p50 and p99, what Ray adds per request at c=1 (1/rps ray - 1/rps plain),
and what the second replica gains at c=16. Then Ray's own floor, in a fresh cluster: an echo deployment called
through a handle from the driver, as forwardpass's ingress calls a model's (``--floor`` runs that part alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from engine import cpu_flags  # noqa: E402
from serve import Proc, lua, medians, wrk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--floor", action="store_true", help="only Ray's own handle round trip")
    args = parser.parse_args()
    if args.floor:
        floor()
        return
    from forwardpass import demo

    tmp = Path(tempfile.mkdtemp(prefix="fp-ray-"))
    body = tmp / "digits.json"
    body.write_text(json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                            "data": [float(i % 17) for i in range(64)]}]}))  # fmt: skip
    script = lua(tmp / "digits.lua", body, {"Content-Type": "application/json"})
    fp = [sys.executable, "-m", "forwardpass", "serve", "{repo}", "--port", "{port}", "--poll-interval", "0",
          "--log-level", "warning"]  # fmt: skip
    repos = {}
    for replicas in (1, 2):
        repo = tmp / f"models-{replicas}"
        shutil.copytree(demo.repository() / "digits", repo / "digits")
        config = yaml.safe_load((repo / "digits" / "model.yaml").read_text())
        config["cache"] = {"enabled": False}  # identical requests must reach the model
        config["scale"] = {"min_replicas": replicas, "max_replicas": replicas}
        (repo / "digits" / "model.yaml").write_text(yaml.safe_dump(config))
        repos[replicas] = repo
    env = {"RAY_USAGE_STATS_ENABLED": "0", "FORWARDPASS_STATE_DIR": str(tmp / "state")}
    plain = Proc("plain", [a.replace("{repo}", str(repos[1])) for a in fp], "/v2/health/ready", env)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for replicas in (1, 2):
            ray = Proc(f"ray{replicas}", [*(a.replace("{repo}", str(repos[replicas])) for a in fp), "--ray"],
                       "/v2/models/digits/ready", env)  # fmt: skip
            try:
                wrk(f"{ray.url}/v2/models/digits/infer", script, 16, args.duration)  # warm-up, not counted: a new
                for _ in range(args.rounds):  # cluster's own start-up work settles first
                    for name, server in (("forwardpass serve", plain), (f"Ray Serve, {replicas} replica(s)", ray)):
                        for c in (1, 16):
                            results.setdefault((name, c), []).append(
                                wrk(f"{server.url}/v2/models/digits/infer", script, c, args.duration))
            finally:
                ray.stop()
    finally:
        plain.stop()
    table = {k: medians(v) for k, v in results.items()}
    print(f"CPU: {cpu_flags()}, {os.cpu_count()} cores; medians of {args.rounds} interleaved rounds of "
          f"{args.duration:g} s; wrk pinned to the last core\n")  # fmt: skip
    print(f"{'server':<28}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}")
    for (name, c), r in table.items():
        print(f"{name:<28}{c:>4}{r['rps']:>10.0f}{r['p50'] * 1e3:>9.2f}{r['p99'] * 1e3:>9.2f}{r['failed']:>8.0f}")
    base = table[("forwardpass serve", 1)]["rps"]
    for replicas in (1, 2):
        ray1 = table[(f"Ray Serve, {replicas} replica(s)", 1)]["rps"]
        print(f"Ray Serve with {replicas} replica(s) adds {(1 / ray1 - 1 / base) * 1e3:.2f} ms a request at c=1 "
              "(Ray's own routing: about 5 ms in its issues)")  # fmt: skip
    one, two = table[("Ray Serve, 1 replica(s)", 16)]["rps"], table[("Ray Serve, 2 replica(s)", 16)]["rps"]
    print(f"the second replica: {two / one:.2f}x the requests/s of one at c=16")
    subprocess.run([sys.executable, __file__, "--floor"], env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, check=True)


def floor(calls: int = 1000) -> None:
    """Ray's own cost of one call: an echo deployment, called from the driver with the settings forwardpass uses."""
    from forwardpass.server import ray_serve

    for name, value in ray_serve._RAY_SETTINGS.items():
        os.environ.setdefault(name, value)
    import ray
    import uvloop
    from ray import serve

    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": dict(ray_serve._RAY_SETTINGS)})  # fmt: skip
    serve.start(proxy_location="Disabled")

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
    class Echo:
        async def __call__(self, message: dict) -> dict:
            return message

    handle = serve.run(Echo.bind(), name="echo", route_prefix=None)
    message = {"method": "POST", "path": "/v2/models/digits/infer", "query": b"", "headers": [], "body": b"x" * 600}

    async def measure() -> list[float]:
        for _ in range(100):
            await handle.remote(message)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            await handle.remote(message)
            times.append(time.perf_counter() - started)
        await serve.shutdown_async()  # the handle routes on this loop: taken down before it closes
        return sorted(times)

    times = uvloop.run(measure())
    print(f"Ray's floor: a handle call to an echo deployment takes {times[len(times) // 2] * 1e3:.2f} ms "
          f"(p99 {times[int(len(times) * 0.99)] * 1e3:.2f} ms), median of {calls}")
    ray.shutdown()


if __name__ == "__main__":
    main()
