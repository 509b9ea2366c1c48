"""Making the candidate variants of an ONNX model: quantized, fp16, graph-optimized offline.

    make("dynamic-int8", source, target, calibration=X)    # writes target (an .onnx file); NotApplicable
                                                          # when the method has nothing to change

Every method is ONNX Runtime's own tool (``onnxruntime.quantization``) or onnxconverter-common's fp16
converter, run on a pre-processed copy (shape inference and ONNX Runtime's basic optimizations, as
``quant_pre_process`` does). A method that leaves the graph without a quantized node (a model of
``ai.onnx.ml`` operators such as LinearClassifier has no MatMul) is NotApplicable, said in the report,
not written as a variant that equals the original.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from forwardpass import _cpu
from forwardpass._deps import require
from forwardpass.errors import ForwardpassError

_PURPOSE = "forwardpass optimize"
QUANTIZABLE = {"MatMul", "Gemm", "Conv"}  # what ONNX Runtime's quantizers replace
# tensors after ai.onnx.ml operators (skl2onnx's Scaler) have no inferred type; they are all float here
_UNTYPED = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT


class NotApplicable(ForwardpassError):
    """A method that would not change this model (said in the report)."""


def vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI): without them ONNX
    Runtime's u8s8 kernels can overflow 16-bit intermediates, so weights are quantized to 7 bits
    (``reduce_range``). Not x86: True (ARM's dot products do not saturate)."""
    found = _cpu.flags()
    return found is None or bool(found & {"avx512_vnni", "avx_vnni"})


def check(method: str) -> None:
    """Refuse an unknown method name before any work (the CLI's --quantize / --prune)."""
    if method.startswith("prune-"):
        percent = method.removeprefix("prune-")
        if not percent.isdigit() or not 0 < int(percent) < 100:
            got = f"{int(percent) / 100:g}" if percent.isdigit() else repr(method)
            raise ForwardpassError(f"--prune: {got}; expected a fraction of units to remove between 0 and 1")
    elif method.startswith("distill-"):
        from forwardpass.optimize.distill import hidden_sizes

        try:
            hidden_sizes(method)
        except ValueError:
            raise ForwardpassError(f"--distill: {method.removeprefix('distill-')!r}; expected hidden layer sizes "
                                   "such as 64 or 32,16 (at most 4 layers), or 0 for a linear student") from None
    elif method not in METHODS:
        raise ForwardpassError(f"--quantize: unknown method {method!r}; expected one of {', '.join(QUANTIZE)} "
                               "(or --graph, --prune FRACTION, --distill SIZES)")  # fmt: skip


def _ops(path: Path) -> set[str]:
    onnx = require("onnx", "optimize", _PURPOSE)
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


# ai.onnx.ml operators whose output ONNX's type inference leaves untyped, though it is always float
_FLOAT_ML = {"Scaler", "Normalizer", "Imputer", "FeatureVectorizer"}


def _prepared(source: Path, work: Path) -> Path:
    """Shape inference + ONNX Runtime's basic graph optimizations, as quant_pre_process does; then every
    tensor typed. An ai.onnx.ml Scaler's output has no inferred type, nor has anything computed from it once
    the optimizations drop skl2onnx's Cast, and ONNX Runtime's calibrators pass over untyped tensors: the
    histogram ones then have nothing to collect ("Histogram has not been collected") and MinMax leaves the
    activations unquantized."""
    onnx = require("onnx", "optimize", _PURPOSE)
    shape = require("onnxruntime.quantization.shape_inference", "optimize", _PURPOSE)
    out = work / "prepared.onnx"
    shape.quant_pre_process(str(source), str(out), skip_symbolic_shape=True)
    model = onnx.load(str(out))
    typed = {v.name for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    untyped = [o for n in model.graph.node if n.op_type in _FLOAT_ML for o in n.output if o not in typed]
    if untyped:
        model.graph.value_info.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in untyped)
        onnx.save(onnx.shape_inference.infer_shapes(model), str(out))
    return out


class _Rows:
    """ONNX Runtime's CalibrationDataReader over validation rows, whole batches only (the histogram
    calibrators stack them)."""

    def __init__(self, name: str, X: np.ndarray, batch: int = 32):
        batch = min(batch, len(X))
        self.batches = iter([{name: X[i : i + batch]} for i in range(0, len(X) - batch + 1, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _input_name(path: Path) -> str:
    onnx = require("onnx", "optimize", _PURPOSE)
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    if len(names) != 1:
        raise NotApplicable(f"static quantization calibrates one input tensor; this model has {len(names)}")
    return names[0]


def _dynamic(source: Path, target: Path, X: np.ndarray | None) -> str:
    q = require("onnxruntime.quantization", "optimize", _PURPOSE)
    with tempfile.TemporaryDirectory() as work:
        q.quantize_dynamic(str(_prepared(source, Path(work))), str(target), weight_type=q.QuantType.QInt8,
                           reduce_range=not vnni(), op_types_to_quantize=sorted(QUANTIZABLE),
                           extra_options=_UNTYPED)  # fmt: skip
    return f"weights int8 per tensor, activations quantized at run time{'' if vnni() else ' (reduce_range: no VNNI)'}"


def _static(method: str) -> Callable[[Path, Path, np.ndarray | None], str]:
    def make(source: Path, target: Path, X: np.ndarray | None) -> str:
        q = require("onnxruntime.quantization", "optimize", _PURPOSE)
        if X is None or not len(X):
            raise NotApplicable("static quantization needs calibration rows (--eval DATA)")
        rows = X[:512].astype(np.float32)
        calibrate = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy}[method]
        with tempfile.TemporaryDirectory() as work:
            prepared = _prepared(source, Path(work))
            q.quantize_static(str(prepared), str(target), _Rows(_input_name(prepared), rows),
                              quant_format=q.QuantFormat.QDQ, per_channel=method == "minmax",
                              reduce_range=not vnni(), activation_type=q.QuantType.QUInt8,
                              weight_type=q.QuantType.QInt8, calibrate_method=calibrate,
                              op_types_to_quantize=sorted(QUANTIZABLE), extra_options=_UNTYPED)  # fmt: skip
        return f"QDQ int8, per-channel weights, activations calibrated ({method}) on {len(rows)} rows"

    return make


def _int4(source: Path, target: Path, X: np.ndarray | None) -> str:
    onnx = require("onnx", "optimize", _PURPOSE)
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", "optimize", _PURPOSE)
    model = onnx.load(str(source))
    quantizer = nbits.MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    onnx.save(quantizer.model.model, str(target))
    return "MatMul weights 4-bit in blocks of 32 (MatMulNBits, int8 activations)"


def _fp16(source: Path, target: Path, X: np.ndarray | None) -> str:
    onnx = require("onnx", "optimize", _PURPOSE)
    float16 = require("onnxconverter_common.float16", "optimize", _PURPOSE)
    model = onnx.load(str(source))
    # a Cast says its output type itself: converting around it left a Cast to float declared float16
    casts = [n.name for n in model.graph.node if n.op_type == "Cast"]
    model = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=casts)
    onnx.save(model, str(target))
    return "weights and activations fp16, inputs and outputs fp32 (keep_io_types)"


def _graph(source: Path, target: Path, X: np.ndarray | None) -> str:
    ort = require("onnxruntime", "optimize", _PURPOSE)
    options = ort.SessionOptions()
    # extended, not all: the layout changes of level 'all' are specific to the CPU that made them
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    return "ONNX Runtime's extended graph optimizations (fusions, constant folding), saved offline"


METHODS: dict[str, tuple[Callable[[Path, Path, Any], str], set[str] | None]] = {
    # method -> (maker, op types of which one must appear in the result; None: any change counts)
    "dynamic-int8": (_dynamic, {"MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger", "DynamicQuantizeLinear"}),
    "static-int8": (_static("minmax"), {"QuantizeLinear", "DequantizeLinear"}),
    "static-int8-entropy": (_static("entropy"), {"QuantizeLinear", "DequantizeLinear"}),
    "int4": (_int4, {"MatMulNBits"}),
    "fp16": (_fp16, None),
    "graph": (_graph, None),
}
QUANTIZE = ("dynamic-int8", "static-int8", "static-int8-entropy", "int4", "fp16")


def make(method: str, source: Path, target: Path, calibration: np.ndarray | None = None,
         task: str = "classification") -> str:  # fmt: skip
    """Write ``method``'s variant of ``source`` to ``target``; a one-line description of what it did.
    ``prune-NN`` removes NN% of each dense hidden layer's units (optimize/prune.py); ``distill-32x16`` trains
    a student with those hidden layers (optimize/distill.py)."""
    check(method)
    if method.startswith("distill-"):
        from forwardpass.optimize.distill import distill, hidden_sizes

        return distill(source, target, calibration, hidden_sizes(method), task)
    if method.startswith("prune-"):
        from forwardpass.optimize.prune import prune

        return prune(source, target, calibration, int(method.removeprefix("prune-")) / 100)
    maker, marks = METHODS[method]
    ops = _ops(source)
    if method in QUANTIZE and method != "fp16" and not ops & QUANTIZABLE:
        raise NotApplicable(f"nothing to quantize: the graph has no {', '.join(sorted(QUANTIZABLE))} "
                            f"(its operators: {', '.join(sorted(ops))})")  # fmt: skip
    described = maker(source, target, calibration)
    if marks is not None and not _ops(target) & marks:
        target.unlink(missing_ok=True)
        raise NotApplicable("the quantizer changed nothing in this graph")
    return described
