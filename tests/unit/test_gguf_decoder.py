"""The ONNX decoder built from GGUF against the numpy reference decoder (same dequantized weights).

At accuracy_level 0 (fp32 activations) the graph computes what the reference computes, up to float
rounding: stated tolerance 1e-4 of the largest logit, through prefill and cached decode steps.
"""

import numpy as np
import pytest

pytest.importorskip("gguf")
ort = pytest.importorskip("onnxruntime")

from test_gguf import needs_model, smollm2_path  # noqa: E402

from forwardpass.convert.gguf_decoder import build_decoder  # noqa: E402
from forwardpass.generation.gguf_file import GGUFFile  # noqa: E402
from forwardpass.generation.reference import ReferenceDecoder  # noqa: E402

CACHE = 64


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model = GGUFFile.open(smollm2_path())
    folder = tmp_path_factory.mktemp("decoder")
    import onnx

    onnx.save(build_decoder(model, accuracy_level=0, max_positions=CACHE, expose_hidden=True), str(folder / "decoder.onnx"),
              save_as_external_data=True, location="decoder.data")  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(folder / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    return model, session, ReferenceDecoder(model)


def empty_cache(hp, dtype=np.float32) -> dict:
    return {f"past_{kv}.{i}": np.zeros((1, hp.n_head_kv, CACHE, hp.head_dim), dtype)
            for i in range(hp.n_layer) for kv in ("key", "value")}  # fmt: skip


def feeds_for(tokens: list[int], position: int, past: dict) -> dict:
    return {"input_ids": np.array([tokens], np.int64), "seqlens_k": np.array([position + len(tokens) - 1], np.int32),
            "total_sequence_length": np.array(position + len(tokens), np.int32), "logit_rows": np.array([1], np.int64),
            **past}  # fmt: skip


@needs_model
def test_prefill_and_decode_match_the_reference(pair):
    model, session, reference = pair
    hp = model.hparams
    names = [o.name for o in session.get_outputs()]
    past = empty_cache(hp)
    reference.reset()
    position = 0
    for tokens in ([1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198], [504], [3575]):
        result = dict(zip(names, session.run(None, feeds_for(tokens, position, past))))
        for i in range(hp.n_layer):  # the cache stays one buffer of CACHE positions (shared past/present)
            past[f"past_key.{i}"], past[f"past_value.{i}"] = result[f"present_key.{i}"], result[f"present_value.{i}"]
            assert past[f"past_key.{i}"].shape == (1, hp.n_head_kv, CACHE, hp.head_dim)
        expected = reference.forward(tokens)[-1]
        got = result["logits"][0, -1]
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
        position += len(tokens)


@needs_model
def test_layer_by_layer(pair):
    """Every block's output (the residual stream) against the reference: 1e-4 of its largest value."""
    model, session, reference = pair
    hp = model.hparams
    tokens = [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47]
    feeds = feeds_for(tokens, 0, empty_cache(hp))
    names = [o.name for o in session.get_outputs()]
    result = dict(zip(names, session.run(None, feeds)))
    reference.reset()
    hidden: list = []
    reference.forward(tokens, hidden=hidden)
    assert len(hidden) == hp.n_layer
    for i, expected in enumerate(hidden):
        got = result[f"hidden.{i}"][0]
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), f"block {i}"


@needs_model
def test_unsupported_quantization_is_named(tmp_path):
    model = GGUFFile.open(smollm2_path())
    model.tensors["blk.0.attn_q.weight"] = type("T", (), {"tensor_type": type("K", (), {"name": "Q6_K"})()})()
    from forwardpass.generation.gguf_file import GGUFError

    with pytest.raises(GGUFError, match="blk.0.attn_q.weight is Q6_K"):
        build_decoder(model)


def kernels_library():
    from forwardpass import kernels

    try:
        return kernels.library()
    except kernels.KernelUnavailable as exc:
        pytest.skip(f"forwardpass's kernels do not build here: {exc}")


@needs_model
def test_forwardpass_kernels_compute_what_the_reference_does(tmp_path):
    """The decoder with forwardpass's Q4_1MatMul (int8 activations, as llama.cpp's Q8_1): near the float
    reference through a prompt and decode steps, the same best token, and one node a linear."""
    import onnx

    model = GGUFFile.open(smollm2_path())
    graph = build_decoder(model, max_positions=CACHE, kernels="forwardpass")
    assert sum(n.op_type == "Q4_1MatMul" for n in graph.graph.node) == 4 * model.hparams.n_layer
    assert not any(n.op_type in ("MatMul", "Add") for n in graph.graph.node)  # no block-sum correction left
    assert sum(n.op_type == "Attention" and n.domain == "forwardpass" for n in graph.graph.node) == model.hparams.n_layer
    assert not any(n.op_type in ("GroupQueryAttention", "Identity", "MatMulNBits") for n in graph.graph.node)
    head = next(n for n in graph.graph.node if n.name == "head")
    assert head.op_type == "Q8_0MatMul" and head.input[1] == "embed_q_1"  # the tied head reads the embedding table
    onnx.save(graph, str(tmp_path / "decoder.onnx"), save_as_external_data=True, location="decoder.data")
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(kernels_library()))
    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    past, position = empty_cache(model.hparams, np.float16), 0  # forwardpass's attention keeps the cache in fp16
    reference = ReferenceDecoder(model)
    for tokens in ([1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198], [504], [3575]):
        result = dict(zip(names, session.run(None, feeds_for(tokens, position, past))))
        for i in range(model.hparams.n_layer):
            past[f"past_key.{i}"], past[f"past_value.{i}"] = result[f"present_key.{i}"], result[f"present_value.{i}"]
        expected, got = reference.forward(tokens)[-1], result["logits"][0, -1]
        assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()
        assert got.argmax() == expected.argmax()
        position += len(tokens)


@needs_model
@pytest.mark.parametrize("kernels", ["onnxruntime", "forwardpass"])
def test_the_int8_and_fp32_rewrites_compute_what_the_reference_does(tmp_path, kernels):
    """forwardpass optimize's variants of an imported decoder (optimize/llm.py), from either form of its Q4_1
    linears: the 4-bit weights read back to floats exactly, so the fp32 rewrite is the reference to float
    rounding; the int8 one (8-bit blocks) is near it, with the same best token."""
    import onnx

    from forwardpass.optimize.llm import rewrite

    if kernels == "forwardpass":
        kernels_library()
    model = GGUFFile.open(smollm2_path())
    (tmp_path / "1").mkdir()
    onnx.save(build_decoder(model, accuracy_level=0, max_positions=CACHE, kernels=kernels),
              str(tmp_path / "1" / "model.onnx"), save_as_external_data=True, location="model.onnx.data")  # fmt: skip
    tokens = [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47]
    expected = ReferenceDecoder(model).forward(tokens)[-1]
    # the fp32 rewrite is exact but for float rounding, and for the fp16 cache with forwardpass's attention
    for weights, tolerance in (("fp32", 1e-4 if kernels == "onnxruntime" else 5e-3), ("int8", 0.05)):
        (tmp_path / weights).mkdir()
        rewrite(tmp_path / "1", tmp_path / weights, weights)
        options = ort.SessionOptions()
        if kernels == "forwardpass":  # the variants keep forwardpass's attention
            options.register_custom_ops_library(str(kernels_library()))
        session = ort.InferenceSession(str(tmp_path / weights / "model.onnx"), options, providers=["CPUExecutionProvider"])
        cache = empty_cache(model.hparams, np.float16 if kernels == "forwardpass" else np.float32)
        got = session.run(["logits"], feeds_for(tokens, 0, cache))[0][0, -1]
        assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max(), (weights, np.abs(got - expected).max())
        assert got.argmax() == expected.argmax(), weights


@needs_model
def test_a_second_prompt_graph_takes_onnx_runtimes_operators_and_a_library_that_does_not_load_is_named(tmp_path):
    """--prefill-accuracy-level is a second graph of ONNX Runtime's fp32 activations: asked for, auto picks ONNX
    Runtime's operators (forwardpass's kernels would compute the same twice) and an explicit choice is refused."""
    import onnx

    from forwardpass.convert.gguf import import_gguf
    from forwardpass.errors import ModelLoadError
    from forwardpass.generation.gguf_file import GGUFError
    from forwardpass.runtime.onnx import open_session

    folder = import_gguf(smollm2_path(), "two", tmp_path, max_context=64, prefill_accuracy_level=1)
    graph = onnx.load(str(folder / "1" / "model.onnx"), load_external_data=False)
    assert not any(o.domain == "forwardpass" for o in graph.opset_import) and (folder / "1" / "prefill.onnx").exists()
    with pytest.raises(GGUFError, match="second prompt graph"):
        import_gguf(smollm2_path(), "three", tmp_path, max_context=64, prefill_accuracy_level=1, kernels="forwardpass")
    with pytest.raises(ModelLoadError, match="could not load"):
        open_session(folder / "1" / "model.onnx", folder / "1" / "model.onnx", intra_op=1,
                     custom_ops=tmp_path / "missing.so")  # fmt: skip
