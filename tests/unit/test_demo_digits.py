"""The demo digits model reads digit images as people make them: drawn larger, thicker or thinner, off centre."""

import io

import numpy as np
import PIL.Image
import pytest
import yaml

import forwardpass
from forwardpass.demo import datasets


def drawn_larger(row: np.ndarray, factor: int) -> bytes:
    """A digits row as a PNG with each ink cell drawn as a factor x factor block."""
    pixels = np.round(row.reshape(8, 8) * 255 / 16).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.kron(pixels, np.ones((factor, factor), np.uint8))).save(buffer, "PNG")
    return buffer.getvalue()


def accuracy(model, images, labels) -> float:
    return float(np.mean(np.asarray([a["label"] for a in model.predict(images)]) == labels))


def test_digits_drawn_four_times_larger_read_as_well_as_the_originals(demo_repo):
    s = datasets.load("digits")
    model = forwardpass.load("digits")
    clean = accuracy(model, [drawn_larger(x, 1) for x in s.X_test], s.y_test)
    larger = accuracy(model, [drawn_larger(x, 4) for x in s.X_test], s.y_test)
    assert larger >= clean - 0.01  # tolerance: one point, 4 of the 450 held-out images (was 0.52 vs 0.97)


def test_varied_accuracy_is_recorded_beside_the_clean_one(demo_repo):
    s = datasets.load("digits")
    metrics = yaml.safe_load((demo_repo / "digits" / "model.yaml").read_text())["metrics"]
    model = forwardpass.load("digits")
    varied = datasets.varied_digits(s.X_test)
    assert list(varied) == list(datasets.VARIATIONS)
    pngs = [datasets.png(image) for images in varied.values() for image in images]
    assert accuracy(model, pngs, np.tile(s.y_test, len(varied))) == pytest.approx(metrics["accuracy_varied"])
    assert metrics["accuracy"] >= 0.97 and metrics["accuracy_varied"] >= 0.95
    for name, images in varied.items():  # no variation left behind
        assert accuracy(model, [datasets.png(i) for i in images], s.y_test) >= 0.9, name
