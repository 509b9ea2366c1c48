"""Greedy agreement with llama-server (issue 17.6): the same chat request at temperature 0 to both servers.

    python bench/agreement.py            # forwardpass serve and llama-server (default flags, and -fa off)

For each stored goldens prompt (tests/goldens/smollm2_greedy.json, made with llama-cpp-python), each server
gets the chat request {"messages": [{"role": "user", ...}], "temperature": 0, "logprobs": true,
"top_logprobs": 2}. The script prints whether the rendered prompts are the same tokens (llama-server's
/apply-template + /tokenize against forwardpass's /tokenize), then, for every pair of generators (the goldens,
forwardpass, llama-server, llama-server -fa off), the first step where the greedy tokens differ and the top-1 /
top-2 logprob margin each side had there. A difference at a margin under 0.5 is a near-tie that int8
activation rounding decides (see tests/unit/test_generation.py); a larger one would be a real disagreement.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generate import GGUF, _free_port, _wait  # noqa: E402
from llama_peer import binaries  # noqa: E402

GOLDENS = HERE.parent / "tests" / "goldens" / "smollm2_greedy.json"


def chat(base: str, user: str, max_tokens: int) -> list[tuple[str, float]]:
    """(token text, top-1 minus top-2 logprob) for each generated token."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": user}], "temperature": 0,
            "max_tokens": max_tokens, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300).raise_for_status().json()
    out = []
    for entry in reply["choices"][0]["logprobs"]["content"]:
        top = entry["top_logprobs"]
        out.append((entry["token"], top[0]["logprob"] - top[1]["logprob"] if len(top) > 1 else float("inf")))
    return out


def first_difference(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x[0] != y[0]), None)


def main() -> None:
    from forwardpass.convert.gguf import import_gguf

    goldens = json.loads(GOLDENS.read_text())
    repo = Path(tempfile.mkdtemp(prefix="fp-agree-"))
    import_gguf(GGUF, "smollm2", repo, max_context=2048)
    procs, bases = [], {}
    port = _free_port()
    procs.append(subprocess.Popen([sys.executable, "-m", "forwardpass", "serve", str(repo), "--port", str(port),
                                   "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    bases["forwardpass"] = f"http://127.0.0.1:{port}"
    for name, flags in (("llama-server", []), ("llama-server -fa off", ["-fa", "off"])):
        p = _free_port()
        procs.append(subprocess.Popen([str(binaries()["llama-server"]), "-m", str(GGUF), "--parallel", "8", "-c", "16384",
                                       "-t", "2", "--host", "127.0.0.1", "--port", str(p), "--alias", "smollm2", *flags],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        bases[name] = f"http://127.0.0.1:{p}"
    try:
        for proc, base in zip(procs, bases.values()):
            _wait(f"{base}/v1/models", proc)
        import forwardpass

        llm = forwardpass.load("smollm2", repository=repo)  # its chat encoding is the one the server runs
        llama = bases["llama-server"]
        for case in goldens["cases"]:
            user, n = case["user"], len(case["greedy_tokens"])
            messages = [{"role": "user", "content": user}]
            text = httpx.post(f"{llama}/apply-template", json={"messages": messages}).json()["prompt"]
            theirs = httpx.post(f"{llama}/tokenize", json={"content": text, "parse_special": True}).json()["tokens"]
            same = theirs == llm.encode_chat(messages) == case["prompt_tokens"]
            runs = {"goldens (llama-cpp-python)": [(llm.tokenizer.decode([t]), m) for t, m in
                                                   zip(case["greedy_tokens"], case["top1_top2_margin"])]}  # fmt: skip
            runs.update({name: chat(base, user, n) for name, base in bases.items()})
            print(f"\n{user!r}: prompt of {len(theirs)} tokens, the same on both servers and in the goldens: {same}")
            for (a, ra), (b, rb) in itertools.combinations(runs.items(), 2):
                step = first_difference(ra, rb)
                if step is None:
                    print(f"  {a} = {b} for all {min(len(ra), len(rb))} tokens")
                else:
                    print(f"  {a} vs {b}: first difference at token {step} ({ra[step][0]!r} / {rb[step][0]!r}); "
                          f"margins there {ra[step][1]:.3f} / {rb[step][1]:.3f}")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
