"""Where a decode step's time goes: ONNX Runtime's profiler over the converted SmolLM2, per kind of node.

    python bench/decode_profile.py [--rows 1 8] [--steps 60] [--context 128] [--kernels forwardpass onnxruntime]

For each row count, ``steps`` decode steps (every row one token, at position ``context`` onward) through
the decoder graph bound to its KV buffers as the engine binds them; the profiler's kernel times summed per
op type (the 4-bit linears, the 8-bit head and the Q4_1 block-sum correction's nodes apart), per step, with
the median whole-run time. Profiling adds a few microseconds to every node (about 700 of them), so the
whole-run time here is above the unprofiled step; compare kinds with each other and the same kind between
row counts; the unprofiled step (timed around each run, no profiler) is printed first. The first 10 steps are left out of the median (allocation, first-use setup). ``--kernels`` picks
the graphs to profile: on forwardpass's own kernels (one Q4_1MatMul node a linear, its Attention; the default
import) and on ONNX Runtime's operators only (MatMulNBits and three correction nodes a linear,
GroupQueryAttention).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine import cpu_flags  # noqa: E402
from generate import GGUF  # noqa: E402

CORRECTION = re.compile(r"l\d+_(qkv|o|gate_up|down)_(split|corr|sum)_\d+")  # convert/gguf_decoder.py's names


def kind(name: str, op: str) -> str:
    """A node's row in the table."""
    if name == "head":
        return f"{op} (8-bit head)"
    if op == "MatMulNBits":
        return "MatMulNBits (4-bit linears)"
    if op == "Q4_1MatMul":
        return "Q4_1MatMul (forwardpass, linears)"
    if CORRECTION.fullmatch(name):
        return f"{op} (Q4_1 correction)"
    return op


def profile(model: Path, rows: int, steps: int, context: int, enable: bool = True) -> tuple[float, dict[str, tuple[float, int]]]:
    """The median step (ms) and, profiled, each kind's kernel time a step (ms) and node count; unprofiled
    (``enable`` false) the median is timed here and the table is empty."""
    from forwardpass import kernels

    options = ort.SessionOptions()
    if kernels.used_by(model):
        options.register_custom_ops_library(str(kernels.library()))
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 2, 0, 4
    options.enable_profiling = enable
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "fp-decode-profile")
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    _, heads, _, dim = shapes["past_key.0"]  # (batch, kv heads, positions, head size)
    layers = sum(name.startswith("past_key.") for name in shapes)
    io = session.io_binding()
    # the engine's buffers: every row max_context (1024 here) positions long
    kinds = {i.name: i.type for i in session.get_inputs()}
    dtype = np.float16 if kinds["past_key.0"] == "tensor(float16)" else np.float32  # forwardpass's attention: fp16
    cache = [np.zeros((rows, heads, 1024, dim), dtype) for _ in range(2 * layers)]
    for i in range(layers):
        for j, which in enumerate(("key", "value")):
            buffer = ort.OrtValue.ortvalue_from_numpy(cache[2 * i + j])
            io.bind_ortvalue_input(f"past_{which}.{i}", buffer)
            io.bind_ortvalue_output(f"present_{which}.{i}", buffer)
    vocab = session.get_outputs()[0].shape[-1]
    io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(np.zeros((rows, 1, vocab), np.float32)))
    for output in session.get_outputs()[1:]:
        if output.name == "hidden_sum":
            width = output.shape[-1]
            io.bind_ortvalue_output("hidden_sum", ort.OrtValue.ortvalue_from_numpy(np.zeros((rows, width), np.float32)))
    io.bind_cpu_input("logit_rows", np.array([rows], np.int64))
    times = []
    for step in range(steps):
        position = context + step
        io.bind_cpu_input("input_ids", np.full((rows, 1), 500 + step, np.int64))
        io.bind_cpu_input("seqlens_k", np.full(rows, position, np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(position + 1, np.int32))
        start = time.perf_counter()
        session.run_with_iobinding(io)
        times.append(time.perf_counter() - start)
    if not enable:
        return statistics.median(times[10:]) * 1000, {}
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_kind: dict[str, float] = collections.Counter()
    nodes: dict[str, int] = collections.Counter()
    runs = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            k = kind(e["name"][: -len("_kernel_time")], e["args"]["op_name"])
            per_kind[k] += e["dur"]
            nodes[k] += 1
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs.append(e["dur"])
    table = {k: (per_kind[k] / steps / 1000, nodes[k] // steps) for k in per_kind}
    return statistics.median(runs[10:]) / 1000, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--context", type=int, default=128, help="positions already in each row's cache")
    parser.add_argument("--kernels", nargs="+", choices=("forwardpass", "onnxruntime"),
                        default=["forwardpass", "onnxruntime"])  # fmt: skip
    args = parser.parse_args()
    from forwardpass.convert.gguf import import_gguf

    repo = Path(tempfile.mkdtemp(prefix="fp-profile-"))
    try:
        print(f"CPU: {cpu_flags()}, {os.cpu_count()} cores; {GGUF.name}; 2 threads; decode at position {args.context}+")
        for which in args.kernels:
            import_gguf(GGUF, which, repo, max_context=1024, kernels=which)
            model = repo / which / "1" / "model.onnx"
            for rows in args.rows:
                plain, _ = profile(model, rows, args.steps, args.context, enable=False)
                run, table = profile(model, rows, args.steps, args.context)
                kernels = sum(ms for ms, _ in table.values())
                print(f"\n{which} kernels, {rows} row{'s' if rows > 1 else ''}: a step {plain:.2f} ms unprofiled; "
                      f"profiled: whole run {run:.2f} ms, kernels {kernels:.2f} ms")  # fmt: skip
                for k, (ms, n) in sorted(table.items(), key=lambda item: -item[1][0]):
                    if ms >= 0.05:
                        print(f"  {k:<36}{ms:7.2f} ms {ms / kernels:6.1%}  {n:4d} nodes")
    finally:
        shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
