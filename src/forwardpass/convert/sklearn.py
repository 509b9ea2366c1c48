"""scikit-learn -> ONNX model folder (feature names, labels, conformal interval, held-out metrics).

Usage::

    from forwardpass.convert.sklearn import import_sklearn
    import_sklearn(pipeline, "churn", "models", X_eval=X_test, y_eval=y_test)

Pickle and joblib files execute code when loaded: ``import_sklearn_file`` refuses them
unless ``trust=True`` (the CLI's ``--trust``).
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from forwardpass._deps import require
from forwardpass.errors import ForwardpassError, ModelLoadError, UntrustedFile
from forwardpass.monitoring.drift import REFERENCE_FILE, Reference, image_of, profile
from forwardpass.repository import check_name

_PURPOSE = "importing scikit-learn models"


def import_sklearn(
    estimator: Any,
    name: str,
    repository: str | Path,
    *,
    feature_names: Sequence[str] | None = None,
    X_calib: Any = None,
    y_calib: Any = None,
    level: float = 0.9,
    X_eval: Any = None,
    y_eval: Any = None,
    X_reference: Any = None,
    description: str = "",
    pre: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Convert a fitted estimator or pipeline into ``repository/name/<next version>/model.onnx``.

    Classifiers get their labels from ``classes_``; regressors get a split-conformal interval at
    ``level`` when calibration data (held out from training) is given. With evaluation data, the
    held-out score of the ONNX model is recorded in model.yaml's ``metrics``. With reference data (the
    training rows), the version gets a drift reference (monitoring/drift.py). Returns the folder.
    """
    sklearn_base = require("sklearn.base", "sklearn", _PURPOSE)
    skl2onnx = require("skl2onnx", "sklearn", _PURPOSE)
    data_types = require("skl2onnx.common.data_types", "sklearn", _PURPOSE)
    check_name(name)
    n_features = getattr(estimator, "n_features_in_", None)
    if n_features is None:
        raise ForwardpassError(f"{type(estimator).__name__} is not fitted (no n_features_in_); fit it first")
    names = list(feature_names or getattr(estimator, "feature_names_in_", [f"x{i}" for i in range(n_features)]))
    if len(names) != n_features:
        raise ForwardpassError(f"{len(names)} feature names for an estimator with {n_features} features")
    is_classifier = sklearn_base.is_classifier(estimator)
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    options = {id(final): {"zipmap": False}} if is_classifier else None
    onnx_model = skl2onnx.to_onnx(
        estimator, initial_types=[("input", data_types.FloatTensorType([None, n_features]))], options=options
    )
    session = _session(onnx_model.SerializeToString())

    tabular = pre is None or pre.get("kind") == "tabular"
    spec: dict[str, Any] = {"name": "input", "datatype": "FP32", "shape": [-1, n_features]}
    if tabular:
        spec["features"] = names
    config: dict[str, Any] = {
        "task": "classification" if is_classifier else "regression",
        "description": description or f"scikit-learn {type(final).__name__}, imported by forwardpass",
        "inputs": [spec],
        "pre": pre or {"kind": "tabular"},
    }
    metrics: dict[str, float] = {}
    if is_classifier:
        labels = [str(c) for c in final.classes_]
        config["labels"] = labels
        config["post"] = {"kind": "classification", "output": "probabilities", "top_k": min(3, len(labels))}
        if len(labels) == 2:
            config["post"]["threshold"] = 0.5
        if X_eval is not None:
            predicted = np.asarray(labels)[_run(session, X_eval)[1].argmax(axis=1)]
            metrics["accuracy"] = float(np.mean(predicted == np.asarray(y_eval).astype(str)))
    else:
        config["post"] = {"kind": "regression", "output": "variable"}
        if X_calib is not None:
            residuals = np.abs(np.asarray(y_calib, np.float64) - _run(session, X_calib)[0].ravel())
            half_width = conformal_half_width(residuals, level)
            config["post"]["interval"] = {"level": level, "conformal": half_width}
        if X_eval is not None:
            y_true = np.asarray(y_eval, np.float64)
            y_pred = _run(session, X_eval)[0].ravel().astype(np.float64)
            metrics["mae"] = float(np.mean(np.abs(y_true - y_pred)))
            metrics["r2"] = float(1 - np.sum((y_true - y_pred) ** 2) / np.sum((y_true - y_true.mean()) ** 2))
            if X_calib is not None:
                metrics[f"interval_coverage_{level:g}"] = float(np.mean(np.abs(y_true - y_pred) <= half_width))
    if X_eval is not None:
        metrics["eval_rows"] = float(len(y_eval))
    config["metrics"] = metrics
    config.update(extra or {})
    files = {}
    if X_reference is not None:
        files[REFERENCE_FILE] = _reference(session, np.asarray(X_reference, np.float32), names, config, is_classifier)
    return write_model_folder(Path(repository), name, config, onnx_model.SerializeToString(), files)


def _reference(session: Any, x: np.ndarray, names: list[str], config: dict[str, Any], classifier: bool) -> bytes:
    """The drift reference of the training rows: their profile, and the model's predictions on them."""
    image = image_of(config["pre"])
    rows, profile_names = profile(x, image)
    outputs = _run(session, x)
    if classifier:
        labels = config["labels"]
        ref = Reference.build(rows, names if image is None else profile_names, classes=outputs[1].argmax(axis=1),
                              n_classes=len(labels), labels=labels)  # fmt: skip
    else:
        ref = Reference.build(rows, names if image is None else profile_names, values=outputs[0].ravel())
    return ref.to_bytes()


def conformal_half_width(residuals: np.ndarray, level: float) -> float:
    """Split-conformal half-width: the ceil((n+1)*level)-th smallest absolute residual."""
    n = len(residuals)
    rank = math.ceil((n + 1) * level)
    if rank > n:
        need = math.ceil(level / (1 - level))
        raise ForwardpassError(f"{n} calibration rows are too few for a {level:.0%} interval; need {need}")
    return float(np.sort(residuals)[rank - 1])


def write_model_folder(repository: Path, name: str, config: dict[str, Any], onnx_bytes: bytes,
                       files: dict[str, bytes] | None = None) -> Path:  # fmt: skip
    """Write model.yaml and the next numbered version (model.onnx and ``files``) atomically (temp folder, rename)."""
    folder = repository / check_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    existing = [int(p.name) for p in folder.iterdir() if p.name.isascii() and p.name.isdigit()]
    version = max(existing, default=0) + 1
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
    try:
        (staging / "model.onnx").write_bytes(onnx_bytes)
        for file_name, data in (files or {}).items():
            (staging / file_name).write_bytes(data)
        os.replace(staging, folder / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    tmp = folder / ".model.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False, width=120), encoding="utf-8")
    os.replace(tmp, folder / "model.yaml")
    return folder


def import_sklearn_file(path: str | Path, name: str, repository: str | Path, *, trust: bool = False, **kwargs: Any) -> Path:
    """Import a pickled/joblib estimator; refuses unless ``trust`` because unpickling runs code."""
    path = Path(path)
    if not trust:
        raise UntrustedFile(
            f"refusing to load {path}: pickle and joblib files can run arbitrary code when loaded. "
            "Pass --trust (trust=True) only for a file you made yourself or got from a source you trust."
        )
    if not path.is_file():
        raise ForwardpassError(f"{path}: no such file")
    joblib = require("joblib", "sklearn", _PURPOSE) if path.suffix in (".joblib", ".jl") else None
    try:
        if joblib is not None:
            estimator = joblib.load(path)
        else:
            with path.open("rb") as f:
                estimator = pickle.load(f)  # noqa: S301 - the caller said trust=True
    except Exception as exc:  # empty, cut short or not a pickle at all: EOFError, UnpicklingError, KeyError, ...
        kind = "joblib" if joblib is not None else "pickle"
        reason = str(exc)[:200] or "no data"
        raise ModelLoadError(f"{path}: not a readable {kind} file ({type(exc).__name__}: {reason}); save the fitted "
                             f"estimator with {kind}.dump and import that file") from None  # fmt: skip
    if not any(callable(getattr(estimator, m, None)) for m in ("predict", "transform")):
        raise ModelLoadError(f"{path}: holds an object of type {type(estimator).__name__}, not a scikit-learn "
                             "estimator or pipeline (it has neither predict nor transform)")  # fmt: skip
    return import_sklearn(estimator, name, repository, **kwargs)


def _session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def _run(session: Any, X: Any) -> list[np.ndarray]:
    return session.run(None, {"input": np.asarray(X, dtype=np.float32)})
