"""Distillation: a smaller student network trained to give the teacher's answers, written as a lean graph.

    described = distill(source, target, X, hidden=(32,))   # writes target; NotApplicable for other shapes

1. Inputs: the calibration rows and perturbed copies of them (``perturbed``): each row twice with Gaussian
   noise of 0.15 of its feature's spread, and four blends of two random rows for each. The teacher answers
   for all of them, so the student learns the teacher's function around the data as well as on it; no labels are needed.
2. Targets, classification: the teacher's log-probabilities, centred per row. Those are the teacher's
   logits up to a constant a row, and regressing them is the high-temperature limit of matching
   temperature-softened outputs (Hinton et al. 2015, section 2.1): the wrong classes' scores, the "dark
   knowledge", count as much as the right one's. Clipped at 1e-12, not softer: on digits a clip at 1e-4 (a
   lower temperature) cost the student 1.3 points of agreement. scikit-learn's MLPClassifier cannot take soft
   targets, so the student is an ``MLPRegressor`` on them. Regression: the teacher's values.
3. The graph is written by hand and kept lean: the input standardization is folded into the first layer's
   weights; Gemm (+Relu, fused by ONNX Runtime at load); the last layer a LinearClassifier (ai.onnx.ml) that
   gives the softmax probabilities and the teacher's class labels in one node (Gemm and Softmax for a model
   without a label output). The teacher's input and output names and types stay, so model.yaml's
   pre/post-processing and labels serve the student unchanged. ``hidden=()`` is a linear student.

For a model of a few small layers, ONNX Runtime's per-node cost outweighs the arithmetic, so the lean graph
counts for as much as the narrower layers; the report measures both together.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from forwardpass._deps import require
from forwardpass.optimize.variants import NotApplicable

_PURPOSE = "forwardpass optimize --distill"
CLIP = 1e-12  # the smallest probability taken as a target: log(0) has no logit
NOISE = 0.15  # perturbation, as a fraction of each feature's standard deviation
SEED = 0
COPIES = 2  # noisy copies a row: on digits 2 (7x the rows in all) made a 32-unit student 0.9 points better than 1


def hidden_sizes(method: str) -> tuple[int, ...]:
    """``distill-64`` -> (64,), ``distill-32x16`` -> (32, 16), ``distill-linear`` -> ()."""
    spec = method.removeprefix("distill-")
    if spec == "linear":
        return ()
    if not re.fullmatch(r"[1-9][0-9]{0,4}(x[1-9][0-9]{0,4}){0,3}", spec):
        raise ValueError(spec)
    return tuple(int(s) for s in spec.split("x"))


def method_name(spec: str) -> str:
    """The CLI's ``--distill 32,16`` (or ``0`` for a linear student) as a method name, ``distill-32x16``."""
    sizes = [s.strip() for s in spec.replace("x", ",").split(",") if s.strip()]
    return "distill-linear" if sizes in (["0"], []) else "distill-" + "x".join(sizes)


def perturbed(X: np.ndarray, seed: int = SEED) -> np.ndarray:
    """X, COPIES noisy copies of every row, and 2 * COPIES blends of random row pairs for every row (float32)."""
    rng = np.random.default_rng(seed)
    spread = X.std(axis=0)
    noisy = [X + rng.normal(size=X.shape) * NOISE * spread for _ in range(COPIES)]
    first, second = rng.integers(0, len(X), (2, 2 * COPIES * len(X)))
    weight = rng.uniform(0, 1, (len(first), 1))
    blends = weight * X[first] + (1 - weight) * X[second]
    return np.vstack([X, *noisy, blends]).astype(np.float32)


def _teacher_outputs(session: Any) -> tuple[str, str | None]:
    """(the float scores output, the label output or None); NotApplicable for other output sets."""
    outputs = session.get_outputs()
    floats = [o for o in outputs if o.type == "tensor(float)"]
    labels = [o for o in outputs if o.type in ("tensor(string)", "tensor(int64)")]
    if len(floats) != 1 or len(labels) > 1 or len(floats) + len(labels) != len(outputs):
        raise NotApplicable("distillation rewrites a model with one float output (and optionally a label output); "
                            f"this one has {', '.join(f'{o.name} ({o.type})' for o in outputs)}")  # fmt: skip
    return floats[0].name, (labels[0].name if labels else None)


def distill(source: Path, target: Path, X: np.ndarray | None, hidden: tuple[int, ...], task: str) -> str:
    """Write a student of ``source`` with ``hidden`` layer sizes to ``target`` (see the module docstring)."""
    ort = require("onnxruntime", "optimize", _PURPOSE)
    neural = require("sklearn.neural_network", "optimize", _PURPOSE)
    if X is None or len(X) < 16:
        raise NotApplicable("distillation needs training rows (--eval DATA with at least 32 rows)")
    teacher = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    inputs = teacher.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 2:
        raise NotApplicable("distillation takes a model with one 2-D float input")
    scores_name, label_name = _teacher_outputs(teacher)
    rows = perturbed(np.asarray(X, np.float32))
    answers = dict(zip([o.name for o in teacher.get_outputs()], teacher.run(None, {inputs[0].name: rows}), strict=True))
    scores = np.asarray(answers[scores_name], np.float64).reshape(len(rows), -1)
    if task == "classification":
        logits = np.log(np.clip(scores, CLIP, 1))
        targets = logits - logits.mean(axis=1, keepdims=True)
    else:
        targets = scores
    mean, std = rows.mean(axis=0), rows.std(axis=0) + 1e-6
    started = time.perf_counter()
    if not hidden:  # a linear student: least squares, closed form
        design = np.hstack([(rows - mean) / std, np.ones((len(rows), 1))])
        solution = np.linalg.lstsq(design, targets, rcond=None)[0]
        weights, biases = [solution[:-1]], [solution[-1]]
    else:
        student = neural.MLPRegressor(hidden_layer_sizes=hidden, max_iter=2000, tol=1e-6, n_iter_no_change=30,
                                      random_state=SEED)  # fmt: skip
        with warnings.catch_warnings():  # max_iter reached: the fit is still what it is, and measured below
            warnings.simplefilter("ignore")
            student.fit((rows - mean) / std, targets)
        weights, biases = list(student.coefs_), list(student.intercepts_)
    seconds = time.perf_counter() - started
    # the standardization folded into the first layer: ((x - mean) / std) @ W + b = x @ (W / std) + (b - mean/std @ W)
    biases[0] = biases[0] - (mean / std) @ weights[0]
    weights[0] = weights[0] / std[:, None]
    classes = _classes(answers, scores, label_name) if task == "classification" else None
    model = _graph(inputs[0], teacher.get_outputs(), scores_name, label_name, weights, biases, classes, task)
    onnx = require("onnx", "optimize", _PURPOSE)
    onnx.save(model, str(target))
    shape = " -> ".join(str(n) for n in (rows.shape[1], *hidden, targets.shape[1]))
    return (f"student {'linear' if not hidden else 'MLP'} {shape} trained on the teacher's "
            f"{'log-probabilities' if task == 'classification' else 'values'} for {len(rows)} rows ({len(X)} and "
            f"perturbed copies) in {seconds:.1f} s; input scaling folded into the first layer")  # fmt: skip


def _classes(answers: dict[str, Any], scores: np.ndarray, label_name: str | None) -> np.ndarray | None:
    """The label of each class index, read off the teacher's own answers (argmax -> label)."""
    if label_name is None:
        return None
    labels = np.asarray(answers[label_name]).reshape(-1)
    index = scores.argmax(axis=1)
    classes = []
    for k in range(scores.shape[1]):
        seen = labels[index == k]
        if not len(seen):
            raise NotApplicable(f"the teacher never answered class {k} on the training rows: its label is unknown")
        classes.append(seen[0])
    return np.array(classes, dtype=object if labels.dtype == object else labels.dtype)


def _graph(input_: Any, outputs: Any, scores_name: str, label_name: str | None, weights: list[np.ndarray],
           biases: list[np.ndarray], classes: np.ndarray | None, task: str) -> Any:  # fmt: skip
    from onnx import TensorProto, helper, numpy_helper

    strings = any(o.name == label_name and o.type == "tensor(string)" for o in outputs)
    nodes, inits = [], []
    x = input_.name
    labelled = task == "classification" and label_name is not None and classes is not None
    for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if k == len(weights) - 1 and labelled:
            break  # the last layer is the classifier node below
        inits += [numpy_helper.from_array(np.ascontiguousarray(w, np.float32), f"student_w{k}"),
                  numpy_helper.from_array(np.ascontiguousarray(b.reshape(-1), np.float32), f"student_b{k}")]  # fmt: skip
        last = k == len(weights) - 1
        out = "student_logits" if last and task == "classification" else scores_name if last else f"student_h{k}"
        nodes.append(helper.make_node("Gemm", [x, f"student_w{k}", f"student_b{k}"], [out + ("" if last else "_pre")]))
        if not last:
            nodes.append(helper.make_node("Relu", [out + "_pre"], [out]))
        x = out
    if labelled:
        # one LinearClassifier node gives the scores, their softmax and the label: in place of Gemm, Softmax,
        # ArgMax and a Gather of the labels, 11.4 µs a call at batch 32 on digits instead of 16.7
        assert classes is not None and label_name is not None
        labels = {"classlabels_strings": [str(c) for c in classes]} if strings else {
            "classlabels_ints": [int(c) for c in classes]}  # fmt: skip
        nodes.append(helper.make_node("LinearClassifier", [x], [label_name, scores_name], domain="ai.onnx.ml",
                                      coefficients=np.asarray(weights[-1], np.float32).T.reshape(-1).tolist(),
                                      intercepts=np.asarray(biases[-1], np.float32).reshape(-1).tolist(),
                                      post_transform="SOFTMAX", **labels))  # fmt: skip
    elif task == "classification":
        nodes.append(helper.make_node("Softmax", ["student_logits"], [scores_name], axis=1))
    width = weights[-1].shape[1]
    declared = {scores_name: helper.make_tensor_value_info(scores_name, TensorProto.FLOAT, [None, width])}
    if label_name is not None:
        kind = TensorProto.STRING if strings else TensorProto.INT64
        declared[label_name] = helper.make_tensor_value_info(label_name, kind, [None])
    graph = helper.make_graph(nodes, "student", [helper.make_tensor_value_info(input_.name, TensorProto.FLOAT,
                                                                                [None, input_.shape[1]])],
                              [declared[o.name] for o in outputs], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)],
                              producer_name="forwardpass distill")  # fmt: skip
    model.ir_version = 8
    return model
