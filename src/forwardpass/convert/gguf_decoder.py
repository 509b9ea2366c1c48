"""GGUF Llama-family decoder -> one ONNX graph of ONNX Runtime's CPU contrib ops.

    model = build_decoder(GGUFFile.open(path), accuracy_level=4)   # onnx.ModelProto

Graph (B batch rows, T new tokens, S cache length, C = n_embd, V = vocab):

    input_ids (B, T) int64 -> embedding rows gathered from the Q8_0 table, dequantized in-graph
    per layer, on ONNX Runtime's operators:
                SkipSimplifiedLayerNormalization (residual + RMSNorm in one kernel)
                qkv = MatMulNBits(4-bit, q/k/v fused) + block-sum correction (Split, MatMul, Add)
                GroupQueryAttention (packed qkv, interleaved rotary from cos/sin caches, past/present KV
                                     buffers that can be one shared buffer)
                o = MatMulNBits + correction; SkipSimplifiedLayerNormalization
                gate|up = MatMulNBits (fused) + correction; SiLU(gate) * up; down = MatMulNBits + correction
    per layer, on forwardpass's kernels (five nodes):
                qkv = Q4_1MatMul(RMSNorm(residual)); Attention; residual = Q4_1MatMul(attn) + residual;
                gate|up = Q4_1MatMul(RMSNorm(residual)); residual = Q4_1MatMul(SiLU(gate) * up) + residual
    last position only -> RMSNorm -> the tied Q8_0 head (8-bit MatMulNBits, or Q8_0MatMul with the norm
    inside) -> logits (B, 1, V)

Inputs: input_ids, seqlens_k (B,) int32 = tokens in the cache after this call - 1,
total_sequence_length () int32, past_key.{i} / past_value.{i} (B, Hkv, S, D) (fp16 with forwardpass's
kernels, else fp32); logit_rows (1,) int64:
logits for the first rows only (the rest are padding).
Outputs: logits, present_key.{i} / present_value.{i}, hidden_sum (the final-normed hidden states summed
over the positions: mean-pooled embeddings). See convert/ggml_quants.py for the
Q4_1 mapping; accuracy_level 4 (int8 activations) is ONNX Runtime's fast CPU path.

``kernels="forwardpass"`` uses forwardpass's own kernels (forwardpass/kernels), each computing a row's
result alone, in one fixed order, whatever rows run beside it: each Q4_1 linear is one Q4_1MatMul node
(GGUF's bytes as they are, int8 activations as llama.cpp's Q8_1, one pass) and attention is forwardpass's
Attention (GroupQueryAttention's inputs, per row and head, several new tokens for any number of rows);
``"onnxruntime"`` uses ONNX Runtime's own operators only: four a linear and GroupQueryAttention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from forwardpass._deps import require
from forwardpass.convert.ggml_quants import block_sum_rows, q4_1_split, q4_1_to_nbits, q8_0_rows, q8_0_to_nbits
from forwardpass.generation.gguf_file import GGUFError, GGUFFile

MS = "com.microsoft"
FP = "forwardpass"  # forwardpass.kernels.DOMAIN (not imported here: building a graph needs no compiler)
KERNELS = ("forwardpass", "onnxruntime")


@dataclass
class _Graph:
    """Nodes and initializers being assembled, with unique names."""

    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    count: int = 0
    shared: dict = field(default_factory=dict)  # constants used by many nodes, stored once
    kernels: str = "onnxruntime"  # whose kernels compute the linears and attention (KERNELS)

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const_once(self, key: str, make: Callable[[], np.ndarray]) -> str:
        if key not in self.shared:
            self.shared[key] = self.const(key, make())
        return self.shared[key]

    def op(self, op_type: str, inputs: list[str], hint: str, outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        names = [self.name(f"{hint}_out{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(hint), domain=domain, **attrs))
        return names


def _q4_linear(g: _Graph, x: str, raws: list[np.ndarray], k: int, level: int, hint: str, *, norm: str = "",
               epsilon: float = 1e-5, residual: str = "", swiglu: bool = False) -> str:
    """x (.., K) @ W.T for Q4_1 weights (several fused along N): Q4_1MatMul, or MatMulNBits + block-sum correction.

    With forwardpass's kernels the node also does what sits beside a linear in a layer (ort_ops.c): RMSNorm of
    x first (``norm``: the weights' initializer), SiLU(gate) * up of x (..., 2K) first (``swiglu``), and
    ``residual`` added to the product."""
    if g.kernels == "forwardpass":
        parts4 = [q4_1_split(r) for r in raws]
        qs, d = np.concatenate([p[0] for p in parts4]), np.concatenate([p[1] for p in parts4])
        m = np.concatenate([p[2] for p in parts4], axis=1)  # (K/32, N): the minimums, transposed
        inputs = [x, g.const(f"{hint}_qs", qs), g.const(f"{hint}_d", d), g.const(f"{hint}_m", m), norm, residual]
        while not inputs[-1]:  # optional inputs left out at the end
            inputs.pop()
        attrs = {"swiglu": 1} if swiglu else {"epsilon": epsilon} if norm else {}
        (out,) = g.op("Q4_1MatMul", inputs, hint, domain=FP, **attrs)
        return out
    assert not (norm or residual or swiglu), "only forwardpass's Q4_1MatMul fuses a norm, SwiGLU or residual"
    parts = [q4_1_to_nbits(r) for r in raws]
    sum_rows, sum_scales = block_sum_rows(k)
    packed = np.concatenate([p[0] for p in parts] + [sum_rows])  # (N + K/32, K/32, 16)
    scales = np.concatenate([p[1] for p in parts] + [sum_scales])
    correction = np.concatenate([p[2] for p in parts], axis=1)  # (K/32, N)
    n, blocks = correction.shape[1], k // 32
    # one kernel gives the product and the per-block input sums: at decode each extra node costs more than
    # its arithmetic (a separate sums MatMul was 10% slower per token: bench/generate.py)
    (y_sums,) = g.op("MatMulNBits", [x, g.const(f"{hint}_B", packed), g.const(f"{hint}_scales", scales)], hint,
                     domain=MS, K=k, N=n + blocks, bits=4, block_size=32, accuracy_level=level)  # fmt: skip
    y, sums = g.op("Split", [y_sums, g.const_once(f"split_{n}_{blocks}", lambda: np.array([n, blocks], np.int64))],
                   f"{hint}_split", outputs=2, axis=-1)  # fmt: skip
    (corr,) = g.op("MatMul", [sums, g.const(f"{hint}_corr", correction)], f"{hint}_corr")  # (B, T, N)
    (out,) = g.op("Add", [y, corr], f"{hint}_sum")
    return out


def _rope_caches(hp, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    half = hp.rope_dim // 2
    theta = hp.rope_base ** (-np.arange(half, dtype=np.float64) * 2 / hp.rope_dim)
    angles = np.arange(max_positions, dtype=np.float64)[:, None] * theta[None, :]  # (P, D/2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build_decoder(model: GGUFFile, *, accuracy_level: int = 4, max_positions: int | None = None,
                  expose_hidden: bool = False, head_accuracy_level: int | None = None,
                  kernels: str = "onnxruntime"):  # fmt: skip
    """The ONNX decoder for a GGUF Llama-family model with Q4_1 linears and a Q8_0 (tied) head.

    ``expose_hidden`` adds outputs ``hidden.{i}``: the residual stream after block i, for
    layer-by-layer checks against the numpy reference. ``head_accuracy_level`` (default: the same)
    lets a prefill graph use fp32 linears while its one-row head keeps the int8 path, whose 8-bit
    fp32 fallback is far slower. ``kernels``: see the module's doc (KERNELS).
    """
    require("onnx", "llm", "converting GGUF models")  # the install hint, before the import below fails bare
    from onnx import TensorProto, helper

    hp = model.hparams
    if hp.rope_dim != hp.head_dim:
        raise GGUFError(f"{model.path}: partial rotary ({hp.rope_dim} of {hp.head_dim} dims) is not supported yet")
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_up.weight"):
        kind = model.tensor(name).tensor_type.name
        if kind != "Q4_1":
            raise GGUFError(f"{model.path}: {name} is {kind}; this converter maps Q4_1 linears (and a Q8_0 head)")
    head_name = "output.weight" if "output.weight" in model.tensors else "token_embd.weight"
    for name in ("token_embd.weight", head_name):
        if model.tensor(name).tensor_type.name != "Q8_0":
            raise GGUFError(f"{model.path}: {name} is {model.tensor(name).tensor_type.name}; Q8_0 is supported")
    if kernels not in KERNELS:
        raise ValueError(f"kernels is {kernels!r}; expected one of {', '.join(KERNELS)}")
    raw = lambda name: np.asarray(model.tensor(name).data)  # noqa: E731
    g = _Graph(kernels=kernels)
    # forwardpass's attention keeps the KV cache in fp16, as llama.cpp does: at 8 rows the cache read a step is as
    # many bytes as the weights (fp32: 46 KB a token); GroupQueryAttention's CPU kernel takes fp32 only
    cache_type = TensorProto.FLOAT16 if kernels == "forwardpass" else TensorProto.FLOAT
    C, D, H, Hkv = hp.n_embd, hp.head_dim, hp.n_head, hp.n_head_kv

    # embedding: gather int8 rows and their block scales, dequantize only the T rows needed; with forwardpass's
    # kernels the table (fp16 scales, as GGUF has them) is also the tied head's weights: one copy in memory
    q, d = q8_0_rows(raw("token_embd.weight"))
    embed_q = g.const("embed_q", q)
    embed_d = g.const("embed_scales", d.astype(np.float16) if kernels == "forwardpass" else d)
    (rows,) = g.op("Gather", [embed_q, "input_ids"], "embed_rows")  # (B, T, C) int8
    (scales,) = g.op("Gather", [embed_d, "input_ids"], "embed_scales")  # (B, T, C/32)
    if kernels == "forwardpass":
        (scales,) = g.op("Cast", [scales], "embed_scales_cast", to=TensorProto.FLOAT)
    (rows_f,) = g.op("Cast", [rows], "embed_cast", to=TensorProto.FLOAT)
    (blocks,) = g.op("Reshape", [rows_f, g.const("embed_blocks", np.array([0, 0, C // 32, 32], np.int64))], "embed_b")
    (scales_u,) = g.op("Unsqueeze", [scales, g.const("last_axis", np.array([-1], np.int64))], "embed_su")
    (scaled,) = g.op("Mul", [blocks, scales_u], "embed_mul")
    (x,) = g.op("Reshape", [scaled, g.const("embed_shape", np.array([0, 0, C], np.int64))], "embed")  # (B, T, C)

    cos, sin = _rope_caches(hp, max_positions or hp.n_ctx)
    cos_name, sin_name = g.const("cos_cache", cos), g.const("sin_cache", sin)
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logit_rows", TensorProto.INT64, [1]),
    ]
    outputs = []
    fused = kernels == "forwardpass"  # five nodes a layer: norms, SwiGLU and residual adds inside the linears
    residual, pending = x, None  # pending: the last sub-block's output, not yet added to the residual (unfused)
    for i in range(hp.n_layer):
        w = lambda name, i=i: f"blk.{i}.{name}.weight"  # noqa: E731 (bound now: called only in this iteration)
        attn_norm = g.const("attn_norm", model.dequantize(w("attn_norm")))
        qkv_raws = [raw(w("attn_q")), raw(w("attn_k")), raw(w("attn_v"))]
        if fused:
            qkv = _q4_linear(g, residual, qkv_raws, C, accuracy_level, f"l{i}_qkv", norm=attn_norm, epsilon=hp.rms_eps)
        else:
            if pending is None:
                (h,) = g.op("SimplifiedLayerNormalization", [residual, attn_norm], f"l{i}_attn_norm",
                            epsilon=hp.rms_eps, axis=-1)  # fmt: skip
            else:
                h, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [pending, residual, attn_norm],
                                         f"l{i}_attn_norm", outputs=4, domain=MS, epsilon=hp.rms_eps)  # fmt: skip
            qkv = _q4_linear(g, h, qkv_raws, C, accuracy_level, f"l{i}_qkv")
        past_k, past_v = f"past_key.{i}", f"past_value.{i}"
        inputs += [helper.make_tensor_value_info(n, cache_type, ["batch", Hkv, "past", D]) for n in (past_k, past_v)]
        if fused:  # the cache written in place when present_* are bound to past_*'s memory
            (attn,) = g.op("Attention", [qkv, past_k, past_v, "seqlens_k", "total_sequence_length", cos_name, sin_name],
                           f"l{i}_attn", domain=FP, num_heads=H, kv_num_heads=Hkv)  # fmt: skip
            g.nodes[-1].output.extend([f"present_key.{i}", f"present_value.{i}"])
        else:
            attn, present_k, present_v = g.op(
                "GroupQueryAttention", [qkv, "", "", past_k, past_v, "seqlens_k", "total_sequence_length", cos_name,
                                        sin_name],
                f"l{i}_attn", outputs=3, domain=MS, num_heads=H, kv_num_heads=Hkv, do_rotary=1, rotary_interleaved=1,
                local_window_size=-1,
            )  # fmt: skip
            for out, name in ((present_k, f"present_key.{i}"), (present_v, f"present_value.{i}")):
                g.nodes.append(helper.make_node("Identity", [out], [name], name=g.name("present")))
        for name in (f"present_key.{i}", f"present_value.{i}"):
            outputs.append(helper.make_tensor_value_info(name, cache_type, ["batch", Hkv, "present", D]))
        ffn_norm = g.const("ffn_norm", model.dequantize(w("ffn_norm")))
        gate_up_raws, down_raws = [raw(w("ffn_gate")), raw(w("ffn_up"))], [raw(w("ffn_down"))]
        if fused:
            residual = _q4_linear(g, attn, [raw(w("attn_output"))], C, accuracy_level, f"l{i}_o", residual=residual)
            gate_up = _q4_linear(g, residual, gate_up_raws, C, accuracy_level, f"l{i}_gate_up", norm=ffn_norm,
                                 epsilon=hp.rms_eps)  # fmt: skip
            residual = _q4_linear(g, gate_up, down_raws, hp.n_ff, accuracy_level, f"l{i}_down", residual=residual,
                                  swiglu=True)  # fmt: skip
            if expose_hidden:
                g.nodes.append(helper.make_node("Identity", [residual], [f"hidden.{i}"], name=g.name("hidden")))
        else:
            o = _q4_linear(g, attn, [raw(w("attn_output"))], C, accuracy_level, f"l{i}_o")
            h, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [o, residual, ffn_norm],
                                     f"l{i}_ffn_norm", outputs=4, domain=MS, epsilon=hp.rms_eps)  # fmt: skip
            gate_up = _q4_linear(g, h, gate_up_raws, C, accuracy_level, f"l{i}_gate_up")
            gate, up = g.op("Split", [gate_up, g.const("split", np.array([hp.n_ff, hp.n_ff], np.int64))], f"l{i}_split",
                            outputs=2, axis=-1)  # fmt: skip
            (sig,) = g.op("Sigmoid", [gate], f"l{i}_sigmoid")
            (silu,) = g.op("Mul", [gate, sig], f"l{i}_silu")
            (act,) = g.op("Mul", [silu, up], f"l{i}_swiglu")
            pending = _q4_linear(g, act, down_raws, hp.n_ff, accuracy_level, f"l{i}_down")
            if expose_hidden:
                g.nodes.append(helper.make_node("Add", [pending, residual], [f"hidden.{i}"], name=g.name("hidden")))
        if expose_hidden:
            outputs.append(helper.make_tensor_value_info(f"hidden.{i}", TensorProto.FLOAT, ["batch", "tokens", C]))

    # the final-normed hidden states of every position, summed per row: mean-pooled embeddings (llama-server's
    # --pooling mean) are these sums over a prompt's chunks / its length; a few microseconds a chunk
    output_norm = g.const("output_norm", model.dequantize("output_norm.weight"))
    if fused:
        (every,) = g.op("SimplifiedLayerNormalization", [residual, output_norm], "pool_norm", epsilon=hp.rms_eps,
                        axis=-1)  # fmt: skip
    else:
        assert pending is not None  # every layer leaves its feed-forward output pending
        every, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [pending, residual, output_norm], "pool_norm",
                              outputs=4, domain=MS, epsilon=hp.rms_eps)  # fmt: skip
    g.op("ReduceSum", [every, g.const("seq_axis_pool", np.array([1], np.int64))], "pool_sum", keepdims=0)
    g.nodes[-1].output[0] = "hidden_sum"
    outputs.append(helper.make_tensor_value_info("hidden_sum", TensorProto.FLOAT, ["batch", C]))

    # only the last position goes through the head: a 512-token prefill would otherwise pay 512 head rows; and
    # only the first `logit_rows` rows (a third of a decode step): a decode call padded with a dummy row
    # (generation/scheduler.py, MIN_ROWS) does not pay for its logits
    last = [g.const("minus1", np.array([-1], np.int64)), g.const("end", np.array([np.iinfo(np.int64).max], np.int64)),
            g.const("seq_axis", np.array([1], np.int64))]  # fmt: skip
    zero, batch_axis = g.const("zero", np.array([0], np.int64)), g.const("batch_axis", np.array([0], np.int64))
    (last_residual,) = g.op("Slice", [residual, *last], "last_residual")
    if fused:  # Q8_0 x Q8_0 as llama.cpp computes it, the final norm inside; the tied head reads the embedding table
        (h,) = g.op("Slice", [last_residual, zero, "logit_rows", batch_axis], "head_rows")
        if head_name == "token_embd.weight":
            head_q, head_d = embed_q, embed_d
        else:
            head_rows, head_scales = q8_0_rows(raw(head_name))
            head_q, head_d = g.const("head_q", head_rows), g.const("head_d", head_scales.astype(np.float16))
        g.nodes.append(helper.make_node("Q8_0MatMul", [h, head_q, head_d, output_norm], ["logits"], name="head",
                                        domain=FP, epsilon=hp.rms_eps))  # fmt: skip
    else:
        assert pending is not None
        (last_pending,) = g.op("Slice", [pending, *last], "last_pending")
        h, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [last_pending, last_residual, output_norm],
                          "final_norm", outputs=4, domain=MS, epsilon=hp.rms_eps)  # fmt: skip
        (h,) = g.op("Slice", [h, zero, "logit_rows", batch_axis], "head_rows")
        head_b, head_scales = q8_0_to_nbits(raw(head_name))
        g.nodes.append(helper.make_node(
            "MatMulNBits", [h, g.const("head_B", head_b), g.const("head_scales", head_scales)], ["logits"], name="head",
            domain=MS, K=C, N=head_b.shape[0], bits=8, block_size=32,
            accuracy_level=accuracy_level if head_accuracy_level is None else head_accuracy_level,
        ))  # fmt: skip
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, hp.n_vocab]))
    graph = helper.make_graph(g.nodes, f"{hp.arch}_decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    if kernels == "forwardpass":
        opsets.append(helper.make_opsetid(FP, 1))
    onnx_model = helper.make_model(graph, opset_imports=opsets)
    onnx_model.ir_version = 9
    return onnx_model
