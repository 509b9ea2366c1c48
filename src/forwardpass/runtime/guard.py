"""Finite-input guards computed inside the ONNX graph.

Rejecting NaN and infinity in float inputs is part of validating a request. In numpy,
``np.isfinite(x).all()`` beside an ONNX Runtime call costs 15-30 us on a 2-core machine
(cache misses between the two libraries; bench/engine.py shows it), as much as the whole
forward pass of a small model. The same check as two graph nodes, ``ReduceSum(x * 0)``,
costs ONNX Runtime 1-6 us in the same run: the sum is NaN exactly when some element is NaN
or infinite (inf * 0 = NaN), and one scalar per input comes back.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np

GUARD_PREFIX = "forwardpass_nonfinite__"
# ONNX TensorProto element types: FLOAT = 1, FLOAT16 = 10, DOUBLE = 11
_FLOATS = {1: np.float32, 10: np.float16, 11: np.float64}


def add_finite_guards(path: Path, allow_nan: Collection[str] = ()) -> bytes | None:
    """The model with one scalar output ``forwardpass_nonfinite__<input>`` per float input.

    Inputs named in ``allow_nan`` are left alone. Returns None (callers fall back to numpy
    checks) when there is nothing to guard, when the model keeps weights in external data
    files (re-serializing it would lose their path), or when the onnx package is missing.
    """
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    floats = [
        (i.name, i.type.tensor_type.elem_type)
        for i in graph.input
        if i.name not in initializers and i.name not in allow_nan and i.type.tensor_type.elem_type in _FLOATS
    ]
    if not floats or any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        return None
    for name, elem in floats:
        zero, zeros, out = f"{GUARD_PREFIX}{name}_zero", f"{GUARD_PREFIX}{name}_zeros", GUARD_PREFIX + name
        graph.initializer.append(numpy_helper.from_array(np.array(0, _FLOATS[elem]), zero))
        graph.node.extend([
            helper.make_node("Mul", [name, zero], [zeros], name=zeros),
            helper.make_node("ReduceSum", [zeros], [out], name=out, keepdims=0),  # no axes: all of them
        ])  # fmt: skip
        graph.output.append(helper.make_tensor_value_info(out, elem, []))
    return model.SerializeToString()
