"""The demo's data: scikit-learn's bundled datasets with fixed, documented held-out splits.

Tests and samples use the same splits the demo models were trained on, so "held out" means
rows no demo model has seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forwardpass._deps import require

SEED = 0


@dataclass(frozen=True)
class Split:
    """Train / (calibration) / test arrays with feature and label names."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    feature_names: list[str]
    target_names: list[str]
    X_calib: np.ndarray | None = None
    y_calib: np.ndarray | None = None


def load(name: str) -> Split:
    """The split for a demo dataset: digits, breast-cancer, iris (75/25, stratified) or diabetes (60/20/20)."""
    datasets = require("sklearn.datasets", "sklearn", "building the demo models")
    selection = require("sklearn.model_selection", "sklearn", "building the demo models")
    loaders = {
        "digits": datasets.load_digits,
        "breast-cancer": datasets.load_breast_cancer,
        "iris": datasets.load_iris,
        "diabetes": datasets.load_diabetes,
    }
    bunch = loaders[name]()
    X, y = bunch.data, bunch.target
    features = [str(f) for f in getattr(bunch, "feature_names", [f"pixel{i}" for i in range(X.shape[1])])]
    targets = [str(t) for t in getattr(bunch, "target_names", [])]
    if name == "diabetes":
        X_rest, X_test, y_rest, y_test = selection.train_test_split(X, y, test_size=0.2, random_state=SEED)
        X_train, X_cal, y_train, y_cal = selection.train_test_split(X_rest, y_rest, test_size=0.25, random_state=SEED)
        return Split(X_train, y_train, X_test, y_test, features, targets, X_cal, y_cal)
    X_train, X_test, y_train, y_test = selection.train_test_split(
        X, y, test_size=0.25, random_state=SEED, stratify=y
    )
    if targets:  # labels as names ("benign"), not indices
        y_train, y_test = np.asarray(targets)[y_train], np.asarray(targets)[y_test]
    return Split(X_train, y_train, X_test, y_test, features, targets)


def digit_png(row: np.ndarray) -> bytes:
    """One 8x8 digits row (ink 0..16) -> a grayscale PNG, white ink on black (pixel = ink * 255 / 16)."""
    import io

    import PIL.Image

    pixels = np.round(np.asarray(row, np.float64).reshape(8, 8) * 255 / 16).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
