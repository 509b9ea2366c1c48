"""Q4_1 and Q8_0 blocks repacked for MatMulNBits give the same products as the dequantized weights."""

import numpy as np
import pytest

pytest.importorskip("gguf")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from test_gguf import needs_model, smollm2_path  # noqa: E402

from forwardpass.convert.ggml_quants import block_sum_rows, q8_0_rows, q8_0_to_nbits  # noqa: E402
from forwardpass.convert.gguf_decoder import _Graph, _q4_linear  # noqa: E402
from forwardpass.generation.gguf_file import GGUFFile  # noqa: E402


@pytest.fixture(scope="module")
def gguf_model():
    return GGUFFile.open(smollm2_path())


def run_matmul(raw: np.ndarray, bits: int, level: int, x: np.ndarray) -> np.ndarray:
    """x @ W.T through the converter's own nodes: _q4_linear for Q4_1, one 8-bit MatMulNBits for Q8_0."""
    n, k = raw.shape[0], x.shape[1]
    g = _Graph()
    if bits == 4:
        out = _q4_linear(g, "x", [raw], k, level, "linear")
    else:
        packed, scales = q8_0_to_nbits(raw)
        (out,) = g.op("MatMulNBits", ["x", g.const("B", packed), g.const("S", scales)], "head", domain="com.microsoft",
                      K=k, N=n, bits=8, block_size=32, accuracy_level=level)  # fmt: skip
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["T", n])], g.inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_block_sum_rows_give_exact_block_sums():
    k = 96
    packed, scales = block_sum_rows(k)
    x = np.random.default_rng(1).normal(size=(2, k)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=3, bits=4,
                            block_size=32, accuracy_level=0)  # fmt: skip
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    sums = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(sums, x.reshape(2, 3, 32).sum(-1), rtol=1e-6, atol=1e-6)


@needs_model
@pytest.mark.parametrize(("name", "bits"), [("blk.0.attn_q.weight", 4), ("blk.3.ffn_down.weight", 4), ("token_embd.weight", 8)])
def test_repacked_blocks_match_dequantized(gguf_model, name, bits):
    raw = np.asarray(gguf_model.tensor(name).data)
    W = gguf_model.dequantize(name)
    x = np.random.default_rng(0).normal(size=(3, W.shape[1])).astype(np.float32)
    reference = x @ W.T
    scale = np.abs(reference).max()
    # fp32 activations: exact up to float rounding (stated tolerance 1e-5 of the largest output)
    assert np.abs(run_matmul(raw, bits, 0, x) - reference).max() <= 1e-5 * scale
    # int8 activations (accuracy_level 4, the fast path): about 5e-3, as llama.cpp's own Q8_1 activations
    assert np.abs(run_matmul(raw, bits, 4, x) - reference).max() <= 2e-2 * scale


@needs_model
def test_q8_0_rows_for_embedding_lookup(gguf_model):
    q, d = q8_0_rows(np.asarray(gguf_model.tensor("token_embd.weight").data))
    rows = (q[[1, 500]].reshape(2, -1, 32).astype(np.float32) * d[[1, 500], :, None]).reshape(2, -1)
    np.testing.assert_array_equal(rows, gguf_model.dequantize("token_embd.weight")[[1, 500]])
