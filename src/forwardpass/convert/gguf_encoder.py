"""A GGUF Llama-family model's first blocks as a sentence encoder: token vectors for mean pooling.

    model = build_encoder(GGUFFile.open(path), layers=1)   # onnx.ModelProto, standard ONNX ops (opset 17)

Graph (B rows, T tokens, C = n_embd, H / Hkv query / key-value heads, D = head_dim):

    input_ids (B, T) int64 -> embedding rows gathered from the Q8_0 table, dequantized in-graph
    per block: RMSNorm; q, k, v (fp32 MatMuls of the dequantized weights); rotary on adjacent pairs;
               causal attention that also masks padded keys (attention_mask (B, T)); o; RMSNorm; SwiGLU
    -> last_hidden_state (B, T, C): the residual stream after ``layers`` blocks

Why the first block (the demo's ``smollm2-embed``): mean-pooled, it put each paraphrase nearest its partner for
11 of 12 low-overlap sentence pairs (tests/integration/test_embeddings.py), where SmolLM2's static token
vectors managed 5 (6 centred) and deeper blocks no better than 9 before the last layers, which cost the whole
model's size; one block adds 14 MB to the 30 MB table and builds in about a second.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from forwardpass._deps import require
from forwardpass.convert.ggml_quants import q8_0_rows
from forwardpass.generation.gguf_file import GGUFError, GGUFFile


class _Nodes:
    """Nodes and initializers being assembled, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def const(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.count += 1
        name = f"{hint}_{self.count}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        from onnx import helper

        self.count += 1
        out = f"{hint}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _ints(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def build_encoder(model: GGUFFile, *, layers: int = 1, max_positions: int = 2048) -> Any:
    """The first ``layers`` blocks of ``model`` as an encoder ONNX graph: (input_ids, attention_mask) ->
    last_hidden_state (B, T, C). Numerically the numpy reference decoder's ``forward(ids, layers=...)``."""
    require("onnx", "llm", "converting GGUF models")
    from onnx import TensorProto, helper

    hp = model.hparams
    if not 1 <= layers <= hp.n_layer:
        raise GGUFError(f"{model.path}: layers={layers}; the model has {hp.n_layer} blocks")
    if hp.rope_dim != hp.head_dim:
        raise GGUFError(f"{model.path}: partial rotary ({hp.rope_dim} of {hp.head_dim} dims) is not supported yet")
    if model.tensor("token_embd.weight").tensor_type.name != "Q8_0":
        raise GGUFError(f"{model.path}: token_embd.weight is {model.tensor('token_embd.weight').tensor_type.name}; "
                        "Q8_0 is supported")  # fmt: skip
    g = _Nodes()
    C, D, H, Hkv = hp.n_embd, hp.head_dim, hp.n_head, hp.n_head_kv
    half = D // 2

    q, d = q8_0_rows(np.asarray(model.tensor("token_embd.weight").data))
    rows = g.op("Cast", [g.op("Gather", [g.const("embed_q", q), "input_ids"], "embed_rows")], "embed_f",
                to=TensorProto.FLOAT)  # (B, T, C)  # fmt: skip
    scales = g.op("Unsqueeze", [g.op("Gather", [g.const("embed_scales", d), "input_ids"], "embed_scales"),
                                g.const("last", _ints(-1))], "embed_su")  # (B, T, C/32, 1)  # fmt: skip
    blocks = g.op("Reshape", [rows, g.const("blocks", _ints(0, 0, C // 32, 32))], "embed_b")
    x = g.op("Reshape", [g.op("Mul", [blocks, scales], "embed_mul"), g.const("c", _ints(0, 0, C))], "embed")

    # positions 0..T-1 and the masks every block shares
    length = g.op("Gather", [g.op("Shape", ["input_ids"], "shape"), g.const("one", np.array(1, np.int64))], "t")
    pos = g.op("Range", [g.const("zero", np.array(0, np.int64)), length, g.const("step", np.array(1, np.int64))], "pos")
    theta = hp.rope_base ** (-np.arange(half, dtype=np.float64) * 2 / hp.rope_dim)
    angles = np.arange(max_positions, dtype=np.float64)[:, None] * theta[None, :]  # (P, D/2)
    mid = g.const("mid", _ints(1, 3))
    cos = g.op("Unsqueeze", [g.op("Gather", [g.const("cos", np.cos(angles).astype(np.float32)), pos], "cos_t"), mid],
               "cos_u")  # (T, 1, D/2, 1)  # fmt: skip
    sin = g.op("Unsqueeze", [g.op("Gather", [g.const("sin", np.sin(angles).astype(np.float32)), pos], "sin_t"), mid],
               "sin_u")  # fmt: skip
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [pos, g.const("a0", _ints(0))], "cols"),
                                  g.op("Unsqueeze", [pos, g.const("a1", _ints(1))], "rows")], "causal")  # (T, T)
    keys = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], "keys_b", to=TensorProto.BOOL),
                              g.const("a12", _ints(1, 2))], "keys")  # (B, 1, 1, T)  # fmt: skip
    allowed = g.op("And", [causal, keys], "allowed")  # (B, 1, T, T)
    neg = g.const("neg", np.array(-1e9, np.float32))  # not -inf: an all-padding row stays finite

    def linear(h: str, name: str) -> str:
        return g.op("MatMul", [h, g.const(name, np.ascontiguousarray(model.dequantize(name).T))], "mm")

    def rotary(t: str, heads: int) -> str:  # (B, T, heads*D) -> (B, T, heads, D), rotated on adjacent pairs
        pairs = g.op("Reshape", [t, g.const("pairs", _ints(0, 0, heads, half, 2))], "pairs")
        e = g.op("Slice", [pairs, g.const("s0", _ints(0)), g.const("e1", _ints(1)), g.const("ax", _ints(-1))], "even")
        o = g.op("Slice", [pairs, g.const("s1", _ints(1)), g.const("e2", _ints(2)), g.const("ax", _ints(-1))], "odd")
        re = g.op("Sub", [g.op("Mul", [e, cos], "ec"), g.op("Mul", [o, sin], "os")], "re")  # (B, T, heads, D/2, 1)
        ro = g.op("Add", [g.op("Mul", [e, sin], "es"), g.op("Mul", [o, cos], "oc")], "ro")
        both = g.op("Concat", [re, ro], "cat", axis=-1)
        return g.op("Reshape", [both, g.const("heads", _ints(0, 0, heads, D))], "rot")

    def repeat_kv(t: str) -> str:  # (B, T, Hkv, D) -> (B, T, H, D): query head h reads kv head h // group
        wide = g.op("Expand", [g.op("Unsqueeze", [t, g.const("g", _ints(3))], "kv_u"),
                               g.const("group", _ints(1, 1, 1, H // Hkv, 1))], "kv_e")  # fmt: skip
        return g.op("Reshape", [wide, g.const("h", _ints(0, 0, H, D))], "kv")

    def rms(t: str, name: str) -> str:
        return g.op("SimplifiedLayerNormalization", [t, g.const(name, model.dequantize(name))], "norm", axis=-1,
                    epsilon=hp.rms_eps)  # fmt: skip

    for i in range(layers):
        h = rms(x, f"blk.{i}.attn_norm.weight")
        qh = g.op("Transpose", [rotary(linear(h, f"blk.{i}.attn_q.weight"), H)], "qt", perm=[0, 2, 1, 3])
        kh = g.op("Transpose", [repeat_kv(rotary(linear(h, f"blk.{i}.attn_k.weight"), Hkv))], "kt", perm=[0, 2, 3, 1])
        v = g.op("Reshape", [linear(h, f"blk.{i}.attn_v.weight"), g.const("kvh", _ints(0, 0, Hkv, D))], "v")
        vh = g.op("Transpose", [repeat_kv(v)], "vt", perm=[0, 2, 1, 3])  # (B, H, T, D)
        scores = g.op("Mul", [g.op("MatMul", [qh, kh], "qk"), g.const("scale", np.array(D**-0.5, np.float32))], "s")
        probs = g.op("Softmax", [g.op("Where", [allowed, scores, neg], "masked")], "p", axis=-1)  # (B, H, T, T)
        attn = g.op("Transpose", [g.op("MatMul", [probs, vh], "pv")], "at", perm=[0, 2, 1, 3])
        attn = g.op("Reshape", [attn, g.const("c", _ints(0, 0, C))], "attn")  # (B, T, C)
        x = g.op("Add", [x, linear(attn, f"blk.{i}.attn_output.weight")], "res")
        h = rms(x, f"blk.{i}.ffn_norm.weight")
        gate, up = linear(h, f"blk.{i}.ffn_gate.weight"), linear(h, f"blk.{i}.ffn_up.weight")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], "sig")], "silu"), up], "swiglu")
        x = g.op("Add", [x, linear(act, f"blk.{i}.ffn_down.weight")], "res")
    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="out"))
    graph = helper.make_graph(
        g.nodes, f"{hp.arch}_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "tokens", C])], g.inits,
    )  # fmt: skip
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 9
    return onnx_model
