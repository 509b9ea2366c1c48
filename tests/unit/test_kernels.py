"""forwardpass's own kernels (forwardpass/kernels): built here, run inside ONNX Runtime as custom ops.

Q4_1MatMul against the float product of the dequantized weights (within what int8 activations allow), against
the plain-C reference in the same library (the vector paths' own sums), and for the property the scheduler
relies on: a row's result does not depend on the rows beside it or on how the outputs are split over threads.
"""

import ctypes

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from forwardpass import kernels  # noqa: E402
from forwardpass.convert.ggml_quants import q4_1_join, q4_1_split  # noqa: E402

try:
    LIBRARY = kernels.library()
except kernels.KernelUnavailable as exc:  # no C compiler: the importer falls back to ONNX Runtime's operators
    pytest.skip(f"forwardpass's kernels do not build here: {exc}", allow_module_level=True)


def build_for(march: str, folder) -> str:
    """The library built for another instruction set than this CPU's best (-march=native picks one path)."""
    import os
    import subprocess

    out = folder / f"libforwardpass_kernels-{march}.so"
    flags = [f if f != "-march=native" else f"-march={march}" for f in kernels.FLAGS]
    cc = os.environ.get("CC", "cc")
    sources = [str(kernels._HERE / name) for name in kernels.SOURCES]
    done = subprocess.run([cc, *flags, "-o", str(out), *sources, "-lm"], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"{cc} cannot build for {march}: {done.stderr[-300:]}")
    return str(out)


@pytest.fixture(scope="module", params=["native", "x86-64-v3", "x86-64"])
def isa(request, tmp_path_factory):
    """Each vector path of the kernels on this CPU: its best (AVX-512 VNNI where it has it), AVX2 (x86-64-v3),
    and plain C (x86-64: no AVX, no F16C). Where the CPU lacks an instruction set, that path is skipped."""
    global LIBRARY
    native = LIBRARY
    if request.param != "native":
        import platform

        if platform.machine() not in ("x86_64", "AMD64"):
            pytest.skip("x86 instruction sets only")
        flags = open("/proc/cpuinfo").read()
        if request.param == "x86-64-v3" and not all(f" {f} " in flags for f in ("avx2", "fma", "f16c", "bmi2")):
            pytest.skip("this CPU has no AVX2")
        LIBRARY = build_for(request.param, tmp_path_factory.mktemp(request.param))
    yield request.param
    LIBRARY = native


def q4_1_bytes(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random GGUF Q4_1 rows (N, K/32 * 20): fp16 d > 0, fp16 m <= 0, 16 bytes of nibbles a block."""
    rng = np.random.default_rng(seed)
    blocks = np.empty((n, k // 32, 20), np.uint8)
    blocks[:, :, 0:2] = rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float16)[..., None].view(np.uint8)
    blocks[:, :, 2:4] = rng.uniform(-0.15, 0.0, (n, k // 32)).astype(np.float16)[..., None].view(np.uint8)
    blocks[:, :, 4:20] = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    return blocks.reshape(n, -1)


def session(n: int, k: int, raw: np.ndarray, threads: int = 2) -> ort.InferenceSession:
    from onnx import TensorProto, helper, numpy_helper

    qs, d, m = q4_1_split(raw)
    node = helper.make_node("Q4_1MatMul", ["x", "qs", "d", "m"], ["y"], domain=kernels.DOMAIN)
    graph = helper.make_graph([node], "q4_1", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n])],
                              [numpy_helper.from_array(qs, "qs"), numpy_helper.from_array(d, "d"),
                               numpy_helper.from_array(m, "m")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(LIBRARY))
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def reference(x: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """The library's plain-C loop over the natural element order (no vector code), for rows of x."""
    lib = ctypes.CDLL(str(LIBRARY))
    qs, d, m = (np.ascontiguousarray(a) for a in q4_1_split(raw))
    rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), np.float32)
    y = np.empty((rows.shape[0], qs.shape[0]), np.float32)
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.fp_q4_1_reference.argtypes = [p, i, i, p, p, p, i, p]
    lib.fp_q4_1_reference(rows.ctypes.data, rows.shape[0], rows.shape[1], qs.ctypes.data, d.ctypes.data,
                          m.ctypes.data, qs.shape[0], y.ctypes.data)  # fmt: skip
    return y.reshape(*x.shape[:-1], -1)


# shapes: the model's (K 576 = four-block groups and a pair left over, 1536 = groups only), an odd leftover
# block (K 96, 160) and outputs that are no multiple of 16
@pytest.mark.parametrize(("n", "k"), [(64, 576), (40, 1536), (37, 96), (19, 160)])
@pytest.mark.parametrize("rows", [(1, 1), (2, 1), (3, 5), (1, 64)])
def test_q4_1_matmul_is_the_quantized_product(isa, n, k, rows):
    raw = q4_1_bytes(n, k)
    x = np.random.default_rng(1).standard_normal((*rows, k)).astype(np.float32)
    y = session(n, k, raw).run(None, {"x": x})[0]
    assert y.shape == (*rows, n)
    exact = x @ q4_1_join(*q4_1_split(raw)).T  # float weights, float activations
    assert np.abs(y - exact).max() <= 2e-2 * np.abs(exact).max()  # int8 activations: ~1/254 of a block's max
    expected = reference(x, raw)
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()  # the same sums, in another order


@pytest.mark.parametrize("n", [200, 37])  # 37: a tail of outputs that four at a time leave (one at a time)
def test_a_row_gives_the_same_bits_alone_beside_others_and_on_one_thread(isa, n):
    k = 576
    raw = q4_1_bytes(n, k, seed=2)
    x = np.random.default_rng(3).standard_normal((1, 11, k)).astype(np.float32)
    together = session(n, k, raw).run(None, {"x": x})[0]
    alone = np.concatenate([session(n, k, raw).run(None, {"x": x[:, i : i + 1]})[0] for i in range(11)], axis=1)
    one_thread = session(n, k, raw, threads=1).run(None, {"x": x})[0]
    assert np.array_equal(together, alone) and np.array_equal(together, one_thread)


def test_weights_read_back_exactly():
    raw = q4_1_bytes(8, 64, seed=4)
    blocks = raw.reshape(8, 2, 20)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[:, :, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # ggml: byte j holds elements j and j + 16
    assert np.array_equal(q4_1_join(*q4_1_split(raw)), (q * d[..., None] + m[..., None]).reshape(8, 64))


def test_wrong_shapes_are_an_error_naming_the_op():
    from onnx import TensorProto, helper, numpy_helper

    raw = q4_1_bytes(16, 64)
    qs, d, m = q4_1_split(raw)
    node = helper.make_node("Q4_1MatMul", ["x", "qs", "d", "m"], ["y"], domain=kernels.DOMAIN)
    graph = helper.make_graph([node], "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "k"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(qs, "qs"), numpy_helper.from_array(d, "d"),
                               numpy_helper.from_array(m, "m")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(LIBRARY))
    s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert s.run(None, {"x": np.ones((2, 64), np.float32)})[0].shape == (2, 16)
    with pytest.raises(Exception, match="Q4_1MatMul: expected X float"):
        s.run(None, {"x": np.ones((2, 96), np.float32)})


def fused_session(n: int, k: int, raw: np.ndarray, norm: np.ndarray | None, residual: bool, swiglu: bool,
                  epsilon: float = 0.5):  # fmt: skip
    """Q4_1MatMul with its fused forms: RMSNorm of X (``epsilon``), SwiGLU of X (..., 2K), + residual."""
    from onnx import TensorProto, helper, numpy_helper

    qs, d, m = q4_1_split(raw)
    inits = [numpy_helper.from_array(qs, "qs"), numpy_helper.from_array(d, "d"), numpy_helper.from_array(m, "m")]
    inputs = ["x", "qs", "d", "m", "norm" if norm is not None else "", "r" if residual else ""]
    if norm is not None:
        inits.append(numpy_helper.from_array(norm, "norm"))
    while inputs[-1] == "":  # trailing optional inputs left out, as the importer writes them
        inputs.pop()
    attrs = {"swiglu": 1} if swiglu else {"epsilon": epsilon}
    node = helper.make_node("Q4_1MatMul", inputs, ["y"], domain=kernels.DOMAIN, **attrs)
    feeds = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", "k"])]
    if residual:
        feeds.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["b", "t", "width"]))
    graph = helper.make_graph([node], "fused", feeds, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(LIBRARY))
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("form", ["norm", "norm+residual", "swiglu+residual", "residual"])
def test_fused_forms_are_the_plain_product_of_the_prepared_rows(isa, form):
    n, k = 40, 160  # 40 outputs: a tail of 8 after two groups of 16
    raw = q4_1_bytes(n, k, seed=7)
    rng = np.random.default_rng(8)
    norm = rng.uniform(0.5, 1.5, k).astype(np.float32) if "norm" in form else None
    swiglu = "swiglu" in form
    # rows of |x| ~ 0.5, so that epsilon (0.5) matters; gates up to +-100, past e^x's clamps
    x = (rng.standard_normal((2, 3, 2 * k if swiglu else k)) * (3 if swiglu else 0.5)).astype(np.float32)
    if swiglu:
        x[0, 0, :4] = [100.0, -100.0, 88.5, -90.0]
    r = rng.standard_normal((2, 3, n)).astype(np.float32)
    feeds = {"x": x, **({"r": r} if "residual" in form else {})}
    fused = fused_session(n, k, raw, norm, "residual" in form, swiglu)
    y = fused.run(None, feeds)[0]
    if norm is not None:
        prepared = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 0.5) * norm
    elif swiglu:
        gate, up = x[..., :k].astype(np.float64), x[..., k:]
        prepared = gate / (1 + np.exp(-gate)) * up
    else:
        prepared = x
    plain = session(n, k, raw).run(None, {"x": prepared.astype(np.float32)})[0]
    expected = plain + r if "residual" in form else plain
    # the same quantized product of rows prepared in float32 here and in float64 by numpy: a block's scale or
    # an element's rounding may differ by one step
    assert np.abs(y - expected).max() <= 1e-2 * np.abs(plain).max()
    alone = np.concatenate([fused.run(None, {name: v[:, j : j + 1] for name, v in feeds.items()})[0]
                            for j in range(3)], axis=1)  # fmt: skip
    assert np.array_equal(y, alone)  # a row's bits do not depend on the rows beside it, fused or not


def test_fused_inputs_of_the_wrong_shape_are_an_error_naming_them():
    n, k = 16, 64
    raw = q4_1_bytes(n, k)
    with_norm = fused_session(n, k, raw, np.ones(k, np.float32), True, False)
    with pytest.raises(Exception, match="Q4_1MatMul: expected residual float of the output's shape"):
        with_norm.run(None, {"x": np.ones((1, 1, k), np.float32), "r": np.ones((1, 1, n + 1), np.float32)})
    with pytest.raises(Exception, match=r"Q4_1MatMul: expected norm float \(64\), the input's width; got rank 1, length 32"):
        fused_session(n, k, raw, np.ones(32, np.float32), False, False).run(None, {"x": np.ones((1, 1, k), np.float32)})
    swiglu = fused_session(n, k, raw, None, False, True)
    with pytest.raises(Exception, match="Q4_1MatMul: expected X float"):
        swiglu.run(None, {"x": np.ones((1, 1, k), np.float32)})  # K 32: qs holds 64 a row
    assert swiglu.run(None, {"x": np.ones((1, 1, 2 * k), np.float32)})[0].shape == (1, 1, n)
    both = fused_session(n, k, raw, np.ones(k, np.float32), False, True)
    with pytest.raises(Exception, match="swiglu and norm together are not supported"):
        both.run(None, {"x": np.ones((1, 1, 2 * k), np.float32)})


def test_the_library_is_built_once_per_source_and_cpu_and_then_needs_no_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("FORWARDPASS_HOME", str(tmp_path / "home"))
    kernels.library.cache_clear()
    try:
        first = kernels.library()
        assert first.is_relative_to(tmp_path / "home" / "kernels") and first.exists()
        stamp = first.stat().st_mtime_ns
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        kernels.library.cache_clear()
        assert kernels.library() == first and first.stat().st_mtime_ns == stamp  # found, not rebuilt, no compiler
        monkeypatch.setenv("FORWARDPASS_HOME", str(tmp_path / "elsewhere"))  # nothing built there
        kernels.library.cache_clear()
        with pytest.raises(kernels.KernelUnavailable, match="no-such-compiler"):
            kernels.library()
        assert not kernels.available()
        assert not list((tmp_path / "elsewhere" / "kernels").rglob("*.tmp"))  # no half-built file left
    finally:
        kernels.library.cache_clear()
        kernels._failed.clear()


# -- Attention ---------------------------------------------------------------------------------------------------

H, HKV, D, S, P = 9, 3, 64, 96, 128  # SmolLM2's heads; a short cache


def attention_session(kind: str, cache: int | None = None) -> ort.InferenceSession:
    from onnx import TensorProto, helper, numpy_helper

    cache = TensorProto.FLOAT if cache is None else cache
    angles = np.arange(P)[:, None] * 10000.0 ** (-np.arange(D // 2) * 2 / D)[None]
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["b", "t", (H + 2 * HKV) * D]),
              helper.make_tensor_value_info("past_key", cache, ["b", HKV, S, D]),
              helper.make_tensor_value_info("past_value", cache, ["b", HKV, S, D]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]  # fmt: skip
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
               *(helper.make_tensor_value_info(n, cache, None) for n in ("key", "value"))]
    caches = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
              numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]  # fmt: skip
    if kind == "onnxruntime":
        node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total",
                                                        "cos", "sin"], ["out", "key", "value"], domain="com.microsoft",
                                num_heads=H, kv_num_heads=HKV, do_rotary=1, rotary_interleaved=1)  # fmt: skip
    else:
        node = helper.make_node("Attention", ["qkv", "past_key", "past_value", "seqlens_k", "total", "cos", "sin"],
                                ["out", "key", "value"], domain=kernels.DOMAIN, num_heads=H, kv_num_heads=HKV)  # fmt: skip
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs, caches),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                             helper.make_opsetid(kernels.DOMAIN, 1)])  # fmt: skip
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(LIBRARY))
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def attention_feeds(rows: int, tokens: int, ends: list[int], seed: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    return {"qkv": rng.standard_normal((rows, tokens, (H + 2 * HKV) * D)).astype(np.float32),
            "past_key": rng.standard_normal((rows, HKV, S, D)).astype(np.float32),
            "past_value": rng.standard_normal((rows, HKV, S, D)).astype(np.float32),
            "seqlens_k": np.array(ends, np.int32), "total": np.array(max(ends) + 1, np.int32)}  # fmt: skip


@pytest.mark.parametrize(("rows", "tokens", "ends"), [(1, 1, [0]), (1, 1, [40]), (3, 1, [5, 90, 37]), (1, 7, [20]),
                                                      (1, 64, [63])])  # fmt: skip
def test_attention_computes_what_group_query_attention_does(isa, rows, tokens, ends):
    feeds = attention_feeds(rows, tokens, ends)
    theirs, ours = attention_session("onnxruntime").run(None, feeds), attention_session("forwardpass").run(None, feeds)
    assert np.abs(ours[0] - theirs[0]).max() <= 1e-5 * np.abs(theirs[0]).max()
    for r, end in enumerate(ends):  # the cache up to each row's end: the new keys rotated, the new values as given
        for got, expected in zip(ours[1:], theirs[1:]):
            assert np.abs(got[r, :, : end + 1] - expected[r, :, : end + 1]).max() <= 1e-5


def test_attention_reads_prompts_of_several_rows_at_once_and_updates_a_bound_cache_in_place():
    """GroupQueryAttention refuses several rows with several new tokens each after a cached prefix; this one takes
    them, each row giving what it gives alone, and writes the cache in place when present is bound to past."""
    feeds = attention_feeds(2, 4, [10, 30])
    session = attention_session("forwardpass")
    alone = [session.run(None, {**{k: v[r : r + 1] for k, v in feeds.items() if k != "total"}, "total": feeds["total"]})
             for r in range(2)]  # fmt: skip
    io = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in feeds.items()}
    for name, value in values.items():
        io.bind_ortvalue_input(name, value)
    io.bind_output("out")  # outputs come back in the order bound
    io.bind_ortvalue_output("key", values["past_key"])
    io.bind_ortvalue_output("value", values["past_value"])
    session.run_with_iobinding(io)
    together = io.copy_outputs_to_cpu()[0]
    for r in range(2):
        assert np.array_equal(together[r], alone[r][0][0])
        assert np.array_equal(feeds["past_key"][r], alone[r][1][0])  # the caller's buffer now holds the new keys
    with pytest.raises(Exception, match="Attention: row 1 ends at position 30 with 40 new tokens"):
        session.run(None, attention_feeds(2, 40, [50, 30]))


def test_attention_keeps_a_half_precision_cache(isa):
    """The decoder's cache is fp16 (as llama.cpp keeps it): the new keys and values are stored as the fp32 cache's
    rounded to fp16 (nearest even), and the outputs stay within fp16's rounding of the fp32 cache's."""
    from onnx import TensorProto

    feeds = attention_feeds(3, 1, [5, 90, 37])
    for name in ("past_key", "past_value"):
        feeds[name] = feeds[name].astype(np.float16)
    half = attention_session("forwardpass", TensorProto.FLOAT16).run(None, feeds)
    wide = attention_session("forwardpass").run(None, {**feeds, "past_key": feeds["past_key"].astype(np.float32),
                                                       "past_value": feeds["past_value"].astype(np.float32)})  # fmt: skip
    assert half[1].dtype == np.float16 and half[2].dtype == np.float16
    assert np.array_equal(half[1], wide[1].astype(np.float16)) and np.array_equal(half[2], wide[2].astype(np.float16))
    assert np.abs(half[0] - wide[0]).max() <= 5e-3 * np.abs(wide[0]).max()


# -- Q8_0MatMul (the tied head) ------------------------------------------------------------------------------------


def q8_0_session(qs: np.ndarray, d: np.ndarray, norm: np.ndarray | None = None, **attrs) -> ort.InferenceSession:
    from onnx import TensorProto, helper, numpy_helper

    n = qs.shape[0]
    inits = [numpy_helper.from_array(qs, "qs"), numpy_helper.from_array(d, "d")]
    if norm is not None:
        inits.append(numpy_helper.from_array(norm, "norm"))
    node = helper.make_node("Q8_0MatMul", ["x", "qs", "d"] + (["norm"] if norm is not None else []), ["y"],
                            domain=kernels.DOMAIN, **attrs)  # fmt: skip
    graph = helper.make_graph([node], "q8_0", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", "k"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(LIBRARY))
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("n", "k"), [(100, 576), (37, 96), (16, 64)])
def test_q8_0_matmul_is_the_quantized_product_and_the_same_for_a_row_alone(isa, n, k):
    rng = np.random.default_rng(6)
    qs = rng.integers(-127, 128, (n, k), dtype=np.int8)
    qs[0, :32] = -128  # a crafted table's extreme: still exact
    d = rng.uniform(0.001, 0.01, (n, k // 32)).astype(np.float16)
    x = rng.standard_normal((1, 6, k)).astype(np.float32)
    session = q8_0_session(qs, d)
    y = session.run(None, {"x": x})[0]
    exact = x @ (qs.reshape(n, -1, 32).astype(np.float32) * d.astype(np.float32)[..., None]).reshape(n, k).T
    assert np.abs(y - exact).max() <= 2e-2 * np.abs(exact).max()
    lib = ctypes.CDLL(str(LIBRARY))
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.fp_q8_0_reference.argtypes = [p, i, i, p, p, i, p]
    rows, expected = np.ascontiguousarray(x[0]), np.empty((6, n), np.float32)
    lib.fp_q8_0_reference(rows.ctypes.data, 6, k, qs.ctypes.data, d.ctypes.data, n, expected.ctypes.data)
    assert np.abs(y[0] - expected).max() <= 1e-5 * np.abs(expected).max()
    alone = np.concatenate([session.run(None, {"x": x[:, j : j + 1]})[0] for j in range(6)], axis=1)
    assert np.array_equal(y, alone)
    with pytest.raises(Exception, match="Q8_0MatMul: expected X float"):
        session.run(None, {"x": np.ones((1, 1, k + 32), np.float32)})


def test_q8_0_matmul_with_its_norm_is_the_product_of_the_normed_rows(isa):
    n, k = 37, 96
    rng = np.random.default_rng(9)
    qs = rng.integers(-127, 128, (n, k), dtype=np.int8)
    d = rng.uniform(0.001, 0.01, (n, k // 32)).astype(np.float16)
    norm = rng.uniform(0.5, 1.5, k).astype(np.float32)
    x = (rng.standard_normal((1, 5, k)) * 0.5).astype(np.float32)
    y = q8_0_session(qs, d, norm, epsilon=0.5).run(None, {"x": x})[0]
    normed = (x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 0.5) * norm).astype(np.float32)
    plain = q8_0_session(qs, d).run(None, {"x": normed})[0]
    assert np.abs(y - plain).max() <= 1e-2 * np.abs(plain).max()
    with pytest.raises(Exception, match="Q8_0MatMul: the swiglu attribute is Q4_1MatMul's only"):
        q8_0_session(qs, d, swiglu=1).run(None, {"x": x})

