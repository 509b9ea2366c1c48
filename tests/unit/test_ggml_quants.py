"""Q4_1 and Q8_0 blocks repacked for MatMulNBits give the same products as the dequantized weights."""

import numpy as np
import pytest

pytest.importorskip("gguf")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from forwardpass.convert.ggml_quants import q4_1_to_nbits, q8_0_to_nbits, q8_0_rows  # noqa: E402
from forwardpass.generation.gguf_file import GGUFFile  # noqa: E402

from test_gguf import needs_model, smollm2_path  # noqa: E402


@pytest.fixture(scope="module")
def gguf_model():
    return GGUFFile.open(smollm2_path())


def run_matmul(raw: np.ndarray, bits: int, level: int, x: np.ndarray) -> np.ndarray:
    n, k = raw.shape[0], x.shape[1]
    nodes, inits = [], []
    if bits == 4:
        packed, scales, correction = q4_1_to_nbits(raw)
        inits += [numpy_helper.from_array(correction, "C"), numpy_helper.from_array(np.array([0, k // 32, 32], np.int64), "shape"),
                  numpy_helper.from_array(np.array([-1], np.int64), "axes")]  # fmt: skip
        nodes += [helper.make_node("Reshape", ["x", "shape"], ["xb"]), helper.make_node("ReduceSum", ["xb", "axes"], ["xs"], keepdims=0),
                  helper.make_node("MatMul", ["xs", "C"], ["corr"]), helper.make_node("Add", ["y0", "corr"], ["y"])]  # fmt: skip
        out = "y0"
    else:
        packed, scales = q8_0_to_nbits(raw)
        out = "y"
    inits += [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    nodes.insert(0, helper.make_node("MatMulNBits", ["x", "B", "S"], [out], domain="com.microsoft", K=k, N=n, bits=bits,
                                     block_size=32, accuracy_level=level))  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", n])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


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
