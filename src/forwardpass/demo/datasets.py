"""The demo's data: scikit-learn's bundled datasets with fixed, documented held-out splits.

Tests and samples use the same splits the demo models were trained on, so "held out" means
rows no demo model has seen. Digits also come as images the way people make them: drawn
larger than 8x8, with thicker or thinner strokes, a pixel off centre (``varied_digits`` for
the held-out rows, ``augmented_digits`` for training).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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


def digit_pixels(X: np.ndarray) -> np.ndarray:
    """Digits rows (ink 0..16) -> (N, 8, 8) uint8 images, white ink on black (pixel = ink * 255 / 16)."""
    return np.round(np.asarray(X, np.float64).reshape(-1, 8, 8) * 255 / 16).astype(np.uint8)


def digit_png(row: np.ndarray, size: int = 8) -> bytes:
    """One 8x8 digits row -> a grayscale PNG, ``size`` pixels square (each ink cell a block when larger)."""
    return png(render(digit_pixels(row), size, smooth=False)[0])


def png(image: Any) -> bytes:
    """A PIL image -> PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render(images: np.ndarray, size: int, smooth: bool) -> list[Any]:
    """(N, h, w) uint8 -> PIL images ``size`` square: pixel blocks (nearest) or smooth (bilinear) when larger."""
    import PIL.Image

    filters = PIL.Image.Resampling
    out = []
    for pixels in images:
        image = PIL.Image.fromarray(pixels, mode="L")
        if image.size != (size, size):
            grow = filters.BILINEAR if smooth else filters.NEAREST
            image = image.resize((size, size), filters.BOX if size < image.size[0] else grow)
        out.append(image)
    return out


_DIRECTIONS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def shifted(images: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """(N, h, w) images moved one pixel: row n towards ``_DIRECTIONS[directions[n]]`` (-1: not moved)."""
    out = images.copy()
    h, w = images.shape[1:]
    for d, (dy, dx) in enumerate(_DIRECTIONS):
        rows = np.flatnonzero(directions == d)
        moved = np.zeros((len(rows), h, w), images.dtype)
        moved[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = images[
            rows, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
        ]
        out[rows] = moved
    return out


def restroked(images: np.ndarray, change: int) -> np.ndarray:
    """(N, 8, 8) -> (N, 32, 32) digits drawn at 4x (smooth) with strokes a pixel thicker (+1) or thinner (-1)."""
    ndimage = require("scipy.ndimage", "sklearn", "building the demo models")
    up = _bicubic_4x()
    big = up @ images.astype(np.float32) @ up.T  # (32, 8) @ (N, 8, 8) @ (8, 32) -> (N, 32, 32)
    big = np.clip(np.round(big), 0, 255).astype(np.uint8)
    return (ndimage.grey_dilation if change > 0 else ndimage.grey_erosion)(big, size=(1, 3, 3))


def _bicubic_4x() -> np.ndarray:
    """(32, 8): Pillow's bicubic 8 -> 32 resize as a matrix (column j: the 8-pixel line e_j resized)."""
    import PIL.Image

    eye = np.eye(8, dtype=np.float32)
    columns = [np.asarray(PIL.Image.fromarray(e[None, :], mode="F").resize((32, 1), PIL.Image.Resampling.BICUBIC))[0]
               for e in eye]  # fmt: skip
    return np.stack(columns, axis=1)


VARIATIONS = ("2x", "4x", "non-integer size", "thicker strokes", "thinner strokes", "1-pixel shift")
_ODD_SIZES = [s for s in range(11, 31) if s % 8]  # not a whole multiple of 8


def varied_digits(X: np.ndarray, seed: int = SEED + 1) -> dict[str, list[Any]]:
    """Every row of ``X`` once per variation, as PIL images (as a person or a program would draw them).

    2x / 4x: each ink cell a 2x2 / 4x4 block; non-integer size: 11..30 pixels square, blocks or
    smooth; thicker / thinner strokes: drawn at 32x32 with grey dilation / erosion; 1-pixel
    shift: moved one pixel in one of the 8 directions.
    """
    rng = np.random.default_rng(seed)
    pixels = digit_pixels(X)
    n = len(pixels)
    sizes, smooth = rng.choice(_ODD_SIZES, n), rng.random(n) < 0.5
    odd = [render(pixels[i : i + 1], int(sizes[i]), bool(smooth[i]))[0] for i in range(n)]
    return {
        "2x": render(pixels, 16, smooth=False),
        "4x": render(pixels, 32, smooth=False),
        "non-integer size": odd,
        "thicker strokes": render(restroked(pixels, +1), 32, smooth=False),
        "thinner strokes": render(restroked(pixels, -1), 32, smooth=False),
        "1-pixel shift": render(shifted(pixels, rng.integers(0, 8, n)), 8, smooth=False),
    }


def augmented_digits(
    X: np.ndarray, copies: int, prepare: Callable[[Sequence[Any]], np.ndarray], seed: int = SEED
) -> np.ndarray:
    """``copies`` varied versions of every row, read back through ``prepare`` (the served pre-processing).

    Each copy of a row is moved a pixel (half of them), re-stroked thicker or thinner (a quarter
    each) and drawn at a random size, then shrunk back to 8x8 by ``prepare``: what the model
    learns from is what the server makes of such an image. Returns (copies * N, 64) in copy order.
    """
    rng = np.random.default_rng(seed)
    pixels = digit_pixels(X)
    n = len(pixels)
    out = np.empty((copies, n, 64), np.float32)
    for c in range(copies):
        moved = shifted(pixels, np.where(rng.random(n) < 0.5, rng.integers(0, 8, n), -1))
        stroke = rng.choice([0, 1, -1], n, p=[0.5, 0.25, 0.25])
        size = rng.choice([8, 12, 16, 20, 24, 28, 32], n)
        smooth = rng.random(n) < 0.5
        for change in (0, 1, -1):
            picked = np.flatnonzero(stroke == change)
            drawn = np.empty((n, 32, 32), np.uint8) if change else moved
            if change and len(picked):
                drawn[picked] = restroked(moved[picked], change)
            for s in np.unique(size):
                for sm in (False, True):
                    rows = np.flatnonzero((stroke == change) & (size == s) & (smooth == sm))
                    if len(rows) == 0:
                        continue
                    if change == 0 and s == 8:  # the image is the row itself: nothing to draw
                        out[c, rows] = moved[rows].reshape(len(rows), 64) * np.float32(16 / 255)
                    else:
                        out[c, rows] = prepare(render(drawn[rows], int(s), bool(sm)))
    return out.reshape(copies * n, 64)
