"""Structured pruning of dense hidden layers: hidden units physically removed, the next layer refitted.

    described = prune(source, target, X, fraction=0.5)   # writes target; NotApplicable without a hidden layer

A hidden layer is the pattern ``MatMul(x, W1) -> Add(b1) -> Relu -> MatMul(W2) -> Add(b2)`` with constant
weights (what skl2onnx writes for an MLP, and a torch Linear-ReLU-Linear export). For each such layer:

1. Importance: the unit's mean activation on the calibration rows times the norm of its outgoing weights
   (what removing it would change downstream), so a unit that rarely fires or barely feeds the next layer
   goes first.
2. The kept ``1 - fraction`` of the units stay: W1 loses columns, b1 entries, W2 rows. The tensors are
   smaller, not zeroed, so the dense kernels do less work.
3. The next layer (W2, b2) is refitted by least squares on the calibration rows, to reproduce what the
   original layer gave (its pre-softmax outputs) from the kept units alone. That recovers most of what the
   removed units carried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from forwardpass._deps import require
from forwardpass.optimize.variants import NotApplicable

_PURPOSE = "forwardpass optimize --prune"


def _layers(graph: Any, inits: dict[str, Any]) -> list[tuple[Any, Any, Any, Any, Any]]:
    """(MatMul1, Add1, Relu, MatMul2, Add2) node chains with constant weights."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only(name: str, op: str) -> Any:
        nodes = consumers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op else None

    found = []
    for m1 in (n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits):
        a1 = only(m1.output[0], "Add")
        relu = a1 and only(a1.output[0], "Relu")
        m2 = relu and only(relu.output[0], "MatMul")
        a2 = m2 and only(m2.output[0], "Add")
        if a2 and m2.input[1] in inits and (set(a1.input) - {m1.output[0]}) <= set(inits) and \
                (set(a2.input) - {m2.output[0]}) <= set(inits):  # fmt: skip
            found.append((m1, a1, relu, m2, a2))
    return found


def _other(node: Any, name: str) -> str:
    return next(i for i in node.input if i != name)


def prune(source: Path, target: Path, X: np.ndarray | None, fraction: float = 0.5) -> str:
    """Write ``source`` with ``fraction`` of each hidden layer's units removed (see the module docstring)."""
    onnx = require("onnx", "optimize", _PURPOSE)
    ort = require("onnxruntime", "optimize", _PURPOSE)
    from onnx import numpy_helper

    if not 0 < fraction < 1:
        raise NotApplicable(f"--prune takes a fraction between 0 and 1; got {fraction}")
    if X is None or len(X) < 8:
        raise NotApplicable("pruning needs calibration rows (--eval DATA)")
    model = onnx.load(str(source))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    layers = _layers(graph, inits)
    if not layers:
        raise NotApplicable("no dense hidden layer (MatMul -> Add -> Relu -> MatMul -> Add) to prune")
    # every layer's input and output, from the original model on the calibration rows
    probe = onnx.load(str(source))
    wanted = [name for m1, *_, a2 in layers for name in (m1.input[0], a2.output[0])]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: X.astype(np.float32)}
    values = dict(zip(wanted, session.run(wanted, feed), strict=True))
    said = []
    for m1, a1, _relu, m2, a2 in layers:
        W1 = numpy_helper.to_array(inits[m1.input[1]])
        b1 = numpy_helper.to_array(inits[_other(a1, m1.output[0])])
        W2 = numpy_helper.to_array(inits[m2.input[1]])
        b2_name = _other(a2, m2.output[0])
        x, z = values[m1.input[0]].astype(np.float64), values[a2.output[0]].astype(np.float64)
        h = np.maximum(x @ W1 + b1.reshape(1, -1), 0)
        importance = h.mean(axis=0) * np.linalg.norm(W2, axis=1)
        units = W1.shape[1]
        keep = np.sort(np.argsort(-importance)[: max(1, round(units * (1 - fraction)))])
        hk = np.hstack([h[:, keep], np.ones((len(h), 1))])
        ridge = 1e-3 * np.eye(hk.shape[1])
        fitted = np.linalg.solve(hk.T @ hk + ridge, hk.T @ z)  # refit the next layer on the kept units
        b1_name, b2_shape = _other(a1, m1.output[0]), numpy_helper.to_array(inits[b2_name]).shape
        new = {m1.input[1]: W1[:, keep], b1_name: b1.reshape(1, -1)[:, keep].reshape((1, -1) if b1.ndim == 2 else -1),
               m2.input[1]: fitted[:-1], b2_name: fitted[-1].reshape(b2_shape)}  # fmt: skip
        for name, array in new.items():
            dtype = numpy_helper.to_array(inits[name]).dtype
            inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        said.append(f"{units} -> {len(keep)} units")
    del graph.value_info[:]  # shapes inside the graph changed; ONNX Runtime infers them again
    onnx.save(model, str(target))
    return (f"hidden layers pruned by importance ({', '.join(said)}), next layer refitted by least squares on "
            f"{len(X)} rows")
