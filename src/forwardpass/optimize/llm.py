"""`forwardpass optimize` for an imported language model: its 4-bit weights against 8-bit and fp32 ones.

    report = optimize("models", "smollm2")     # variants int8 and fp32; fp32 is also the reference

1. Variants are rewrites of the served graphs (model.onnx, and prefill.onnx when there is one), written as
   new versions (``rewrite``). Each Q4_1 linear that `forwardpass import gguf` wrote (a 4-bit MatMulNBits, a
   Split, the block-sum correction MatMul and an Add: see convert/ggml_quants.py) is read back to its
   float weights, exactly, and written again as
   - ``int8``: an 8-bit MatMulNBits over blocks of 32 (as Q8_0 stores them; same accuracy level);
   - ``fp32``: a plain MatMul, the 8-bit head dequantized too: the reference. The weights before GGUF's
     quantization do not ship; fp32 is the 4-bit values in full precision.
2. Quality on a held-out text (``data``: a UTF-8 .txt file; else scikit-learn's dataset descriptions), cut to
   TOKENS tokens and read by every decoder one token a step (teacher forcing). At each position: whether a
   decoder's most likely next token is fp32's (next-token agreement, the guarded metric, its drop against the
   original with a paired 95% bootstrap interval), and its log-likelihood of the true next token (perplexity).
3. Speed: decode steps in interleaved rounds of 128 steps a decoder (contexts 1..128, the cores a served
   decoder uses); tokens/s is one over the median step. Not every step in lockstep: a session's threads spin
   a while after its run, as served, and took the cores from the next one (it halved the measured speed).
The verdicts, the recommendation (the fastest accepted, at least MIN_GAIN faster) and ``promote`` are the
tabular models' (optimize/__init__.py).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forwardpass._deps import require
from forwardpass.errors import ForwardpassError

METHODS = ("int8", "fp32")
TOKENS = 256  # positions of the held-out text read by every decoder
STEPS = 128  # timed decode steps a decoder and round
_PURPOSE = "forwardpass optimize (language models)"
MS = "com.microsoft"


def held_out_text() -> str:
    """scikit-learn's dataset descriptions (sklearn/datasets/descr/*.rst, in name order): text no step of
    forwardpass has trained or calibrated on."""
    sklearn = require("sklearn", "optimize", _PURPOSE)
    descr = Path(str(sklearn.__file__)).parent / "datasets" / "descr"
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(descr.glob("*.rst")))


def rewrite(source: Path, target: Path, weights: str) -> str:
    """The version folder ``source``'s graphs with their Q4_1 linears as ``weights`` (int8 or fp32) into
    ``target`` (a new version folder); what was done, for the report."""
    onnx = require("onnx", "optimize", _PURPOSE)
    graphs = [p for p in (source / "model.onnx", source / "prefill.onnx") if p.is_file()]
    changed = 0
    for path in graphs:
        model = onnx.load(str(path))  # with its external data
        changed = _rewrite_graph(model, weights)
        if not changed:
            raise ForwardpassError(f"{path}: no 4-bit linear (MatMulNBits, Split, MatMul, Add) to rewrite: this "
                                   "graph was not written by `forwardpass import gguf`")  # fmt: skip
        onnx.save(model, str(target / path.name), save_as_external_data=True, location=f"{path.name}.data")
    for extra in source.iterdir():  # anything else the version holds (none today), as it is
        if extra.is_file() and not extra.name.startswith(("model.onnx", "prefill.onnx")):
            shutil.copy2(extra, target / extra.name)
    what = ("8-bit MatMulNBits over blocks of 32 (int8 activations where the original has them)" if weights == "int8"
            else "fp32 MatMuls, head dequantized too: the reference")  # fmt: skip
    return f"{changed} linears a graph re-written from the 4-bit weights as {what}"


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _rewrite_graph(model: Any, weights: str) -> int:
    from onnx import numpy_helper

    from forwardpass.convert.ggml_quants import q4_1_join

    graph = model.graph
    # the int8 variant's accuracy level: the original head's (int8 activations where the original has them)
    level = next((_attrs(n).get("accuracy_level", 0) for n in graph.node if n.op_type == "MatMulNBits"), 4)
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    drop: set[int] = set()
    replace: dict[int, list[Any]] = {}
    count = 0
    for node in graph.node:
        attrs = _attrs(node)
        if node.op_type == "Q8_0MatMul" and weights == "fp32":  # forwardpass's head: q * d (kept as it is in int8)
            q8 = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            d8 = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
            w = (q8.reshape(q8.shape[0], -1, 32) * d8[..., None]).reshape(q8.shape)
            replace[id(node)] = _unfused(graph, node, w, "fp32", level)
            continue
        if node.op_type == "Q4_1MatMul":  # forwardpass's kernel: GGUF's Q4_1 bytes (convert/ggml_quants.q4_1_split)
            qs, d4, m4 = (numpy_helper.to_array(inits[name]) for name in node.input[1:4])
            replace[id(node)] = _unfused(graph, node, q4_1_join(qs, d4, m4), weights, level)
            count += 1
            continue
        if node.op_type != "MatMulNBits" or node.domain != MS:
            continue
        if attrs.get("bits") == 8 and weights == "fp32":  # the head: (q - 128) * d
            q = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32) - 128
            d = numpy_helper.to_array(inits[node.input[2]]).reshape(q.shape[0], q.shape[1], 1)
            w = (q * d).reshape(q.shape[0], -1)
            replace[id(node)] = [_linear(graph, node.name, node.input[0], w, "fp32", list(node.output), level)]
            continue
        if attrs.get("bits") != 4:
            continue
        (split,) = users[node.output[0]]
        (corr,) = users[split.output[1]]
        (add,) = users[split.output[0]]
        correction = numpy_helper.to_array(inits[corr.input[1]])  # (K/32, N): 8 d + m per block and row
        n, blocks = correction.shape[1], correction.shape[0]
        packed = numpy_helper.to_array(inits[node.input[1]])[:n]  # (N, K/32, 16): the block-sum rows dropped
        d = numpy_helper.to_array(inits[node.input[2]])[: n * blocks].reshape(n, blocks, 1)
        q = np.empty((n, blocks, 32), np.float32)
        q[..., 0::2], q[..., 1::2] = packed & 0x0F, packed >> 4  # byte i holds elements 2i (low), 2i+1
        w = ((q - 8) * d + correction.T[..., None]).reshape(n, -1)  # Q4_1: q d + m
        replace[id(node)] = [_linear(graph, node.name, node.input[0], w, weights, list(add.output),
                                     attrs.get("accuracy_level", 0))]  # fmt: skip
        drop.update({id(split), id(corr), id(add)})
        count += 1
    nodes = [m for n in graph.node if id(n) not in drop for m in replace.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(n.domain == "forwardpass" for n in graph.node):  # no forwardpass kernel left: nor its domain
        kept_sets = [o for o in model.opset_import if o.domain != "forwardpass"]
        del model.opset_import[:]
        model.opset_import.extend(kept_sets)
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return count


def _unfused(graph: Any, node: Any, w: np.ndarray, weights: str, level: int) -> list[Any]:
    """A forwardpass linear (Q4_1MatMul, Q8_0MatMul) as ONNX's own nodes: what it fuses (RMSNorm or SiLU(gate)
    * up of its input, a residual added to its product: kernels/ort_ops.c) as the nodes that compute it, around
    ``_linear``'s node."""
    from onnx import helper

    attrs, hint = _attrs(node), node.name
    optional = list(node.input[4:6] if node.op_type == "Q4_1MatMul" else node.input[3:4])
    norm, residual = (optional + ["", ""])[:2]
    x, nodes = node.input[0], []
    if norm:
        nodes.append(helper.make_node("SimplifiedLayerNormalization", [x, norm], [x := f"{hint}_normed"],
                                      name=f"{hint}_norm", epsilon=attrs.get("epsilon", 1e-5), axis=-1))  # fmt: skip
    if attrs.get("swiglu"):
        k = w.shape[1]
        halves = _const(graph, f"{hint}_halves", np.array([k, k], np.int64))
        nodes += [helper.make_node("Split", [x, halves], [f"{hint}_gate", f"{hint}_up"], name=f"{hint}_split", axis=-1),
                  helper.make_node("Sigmoid", [f"{hint}_gate"], [f"{hint}_sig"], name=f"{hint}_sigmoid"),
                  helper.make_node("Mul", [f"{hint}_gate", f"{hint}_sig"], [f"{hint}_silu"], name=f"{hint}_silu"),
                  helper.make_node("Mul", [f"{hint}_silu", f"{hint}_up"], [x := f"{hint}_act"], name=f"{hint}_act")]
    product = [f"{hint}_product"] if residual else list(node.output)
    nodes.append(_linear(graph, hint, x, w, weights, product, level))
    if residual:
        nodes.append(helper.make_node("Add", [product[0], residual], list(node.output), name=f"{hint}_residual"))
    return nodes


def _linear(graph: Any, hint: str, x: str, w: np.ndarray, weights: str, outputs: list[str], level: int) -> Any:
    """The node computing x @ w.T (w (N, K) float) as ``weights``: fp32 MatMul or 8-bit MatMulNBits."""
    from onnx import helper

    from forwardpass.convert.ggml_quants import int8_blocks

    if weights == "fp32":
        return helper.make_node("MatMul", [x, _const(graph, f"{hint}_W", w.T)], outputs, name=hint)
    b8, s8 = int8_blocks(w)
    return helper.make_node("MatMulNBits", [x, _const(graph, f"{hint}_B8", b8), _const(graph, f"{hint}_S8", s8)],
                            outputs, name=hint, domain=MS, K=w.shape[1], N=w.shape[0], bits=8, block_size=32,
                            accuracy_level=level)  # fmt: skip


def _const(graph: Any, name: str, array: np.ndarray) -> str:
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


def evaluate(folders: dict[str, Path], gen: Any, tokenizer_path: Path, text: str, rounds: int,
             say: Callable[[str, int, int], object]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per decoder (``folders``: name -> version folder; one named fp32 is the reference): step times (s),
    best next token and log-likelihood of the true one at each position of ``text``."""
    tokenizers = require("tokenizers", "llm", _PURPOSE)
    from forwardpass.generation.session import DecoderSession

    ids = tokenizers.Tokenizer.from_file(str(tokenizer_path)).encode(text).ids[: TOKENS + 1]
    if len(ids) < 16:
        raise ForwardpassError(f"the held-out text is {len(ids)} tokens; give at least 16")
    context = max(len(ids), STEPS) + 8
    sessions = {}
    for name, folder in folders.items():
        prefill = folder / "prefill.onnx"
        sessions[name] = DecoderSession(folder / "model.onnx", n_layer=gen.n_layer, n_head_kv=gen.n_head_kv,
                                        head_dim=gen.head_dim, n_vocab=gen.n_vocab, max_context=context,
                                        prefill_path=prefill if prefill.is_file() else None)  # fmt: skip
    out: dict[str, dict[str, Any]] = {name: {"best": [], "loglik": [], "seconds": []} for name in sessions}
    for t in range(len(ids) - 1):
        for name, session in sessions.items():
            logits = session.step([ids[t]]).astype(np.float64)
            top = logits.max()
            out[name]["best"].append(int(logits.argmax()))
            out[name]["loglik"].append(float(logits[ids[t + 1]] - top - np.log(np.exp(logits - top).sum())))
        say(f"quality on {len(ids) - 1} tokens", t + 1, len(ids) - 1)
    steps = [*ids, *ids][:STEPS]
    for r in range(rounds):
        for name, session in sessions.items():
            session.reset()
            for token in steps:
                start = time.perf_counter()
                session.step([token])
                out[name]["seconds"].append(time.perf_counter() - start)
        say(f"timing {len(sessions)} decoders, {STEPS} steps a round", r + 1, rounds)
    return out


def optimize_llm(repo: Any, name: str, config: Any, methods: Sequence[str] | None, *, data: str | Path | None,
                 max_drop: float, promote: bool, rounds: int, say: Callable[[str, int, int], object]) -> Any:  # fmt: skip
    """optimize() for a language model (see the module docstring)."""
    from forwardpass import _cpu
    from forwardpass.optimize import OptimizeReport, Row, _conclude, _new_version, _pin, _size, _variant_row, verdict

    wanted = list(methods or METHODS)
    for method in wanted:
        if method not in METHODS:
            raise ForwardpassError(f"--quantize: {method!r} does not apply to a language model; expected "
                                   f"{' or '.join(METHODS)} (its weights as 8-bit blocks, or fp32)")  # fmt: skip
    if "fp32" not in wanted:
        wanted.append("fp32")  # the reference every decoder is judged against
    served = repo.selected_versions(name, config)
    if not served:
        raise ForwardpassError(f"model '{name}' has no version to start from")
    original, folder = served[-1], repo.folder(name)
    if data is not None and Path(data).suffix != ".txt":
        raise ForwardpassError(f"{data}: a language model is judged on a held-out text: give a UTF-8 .txt file")
    try:
        text = Path(data).read_text(encoding="utf-8") if data is not None else held_out_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ForwardpassError(f"{data}: cannot be read as UTF-8 text ({exc})") from None
    where = (f"{data}" if data is not None else "scikit-learn's dataset descriptions") + f" (first {TOKENS} tokens)"
    _pin(folder, served)
    rows = [Row("original", original, f"version {original} as served", _size(folder / str(original)))]
    folders = {"original": folder / str(original)}
    for i, method in enumerate(wanted):
        say(f"making variants ({method})", i, len(wanted))
        target = _new_version(folder)
        try:
            described = rewrite(folder / str(original), target, method)
        except BaseException:
            shutil.rmtree(target)
            raise
        rows.append(_variant_row(target, method, original, described))
        folders[method] = target
    say("making variants", len(wanted), len(wanted))
    results = evaluate(folders, config.generation, folder / "tokenizer.json", text, rounds, say)
    reference = np.array(results["fp32"]["best"])
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(reference), (1000, len(reference)))
    base = (np.array(results["original"]["best"]) == reference).astype(np.float64)
    for row in rows:
        r = results[row.variant]
        same = (np.array(r["best"]) == reference).astype(np.float64)
        seconds = np.array(r["seconds"])
        row.p50_ms, row.p99_ms = {1: 1000 * float(np.median(seconds))}, {1: 1000 * float(np.percentile(seconds, 99))}
        row.throughput = 1 / float(np.median(seconds))  # decode tokens/s
        low, high = np.percentile(base[draws].mean(axis=1) - same[draws].mean(axis=1), [2.5, 97.5])
        drop = float(base.mean() - same.mean())
        perplexity = float(np.exp(-np.mean(r["loglik"])))
        row.quality = {"metric": "next-token agreement with fp32", "value": float(same.mean()), "drop": drop,
                       "low": float(low), "high": float(high), "perplexity": perplexity}  # fmt: skip
        row.verdict = verdict(drop, float(high), max_drop)
    report = OptimizeReport(name, original, where, rows, "original", max_drop, False, _cpu.describe(),
                            folder / "optimize", kind="generation")  # fmt: skip
    return _conclude(report, folder, promote)


def markdown(r: Any) -> str:
    """The report of a language model's variants (OptimizeReport with kind 'generation')."""
    from forwardpass.optimize import MIN_GAIN

    ref = r.row("fp32").quality["perplexity"]
    lines = [
        f"# forwardpass optimize: {r.model}",
        "",
        f"From version {r.original}; judged on {r.data}, read one token a step by every decoder; decode timed "
        f"in interleaved rounds of {STEPS} steps; CPU {r.cpu}. Agreement: the most likely next token is the fp32 "
        "decoder's, whose weights are the 4-bit ones' own values in full precision (the weights before GGUF's "
        f"quantization do not ship). Guard: a drop of at most {r.max_drop:.3g} in agreement against the original "
        "(flagged when its 95% interval reaches past it).",
        "",
        "| variant | version | size MiB | decode tokens/s | step p50 / p99 ms | next-token agreement with fp32 | "
        "drop (95% interval) | perplexity | vs fp32 | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r.rows:
        q = row.quality
        lines.append(f"| {row.variant} | {row.version} | {row.size_bytes / 2**20:.0f} | {row.throughput:.1f} | "
                     f"{row.p50_ms[1]:.2f} / {row.p99_ms[1]:.2f} | {q['value']:.4f} | {q['drop']:+.4f} "
                     f"({q['low']:+.4f}, {q['high']:+.4f}) | {q['perplexity']:.3f} | {q['perplexity'] / ref - 1:+.2%} | "
                     f"{row.verdict} |")  # fmt: skip
    base, best = r.row("original"), r.row(r.recommended)
    lines += ["", f"**Recommended: {r.recommended}**"
              + (f" (version {best.version}): {best.throughput / base.throughput:.2f}x the original's decode tokens/s, "
                 f"agreement {best.quality['drop']:+.4f}." if r.recommended != "original" else
                 f": no accepted variant was {MIN_GAIN:.2f}x the original's decode tokens/s or more; the original "
                 "stays.")]  # fmt: skip
    lines.append(f"{'Promoted: it is the served version now.' if r.promoted else 'Not promoted (--promote serves it).'}")
    for row in r.rows[1:]:
        lines.append(f"- {row.variant}: {row.described}")
    return "\n".join(lines) + "\n"
