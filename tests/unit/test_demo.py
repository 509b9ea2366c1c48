"""The built-in demo repository meets its accuracy claims on held-out data."""

import importlib.util

import numpy as np
import pytest
import yaml

import forwardpass
from forwardpass.demo import datasets


def test_demo_lists_its_models(demo_repo):
    names = forwardpass.Repository(demo_repo).names()
    assert {"digits", "breast-cancer", "diabetes", "iris"} <= set(names)
    assert ("silero-vad" in names) == (importlib.util.find_spec("silero_vad") is not None)


def test_demo_is_built_once(demo_repo):
    from forwardpass import demo

    stamp = (demo_repo / "digits" / "1" / "model.onnx").stat().st_mtime_ns
    assert demo.repository() == demo_repo
    assert (demo_repo / "digits" / "1" / "model.onnx").stat().st_mtime_ns == stamp


def test_digits_from_png_images(demo_repo):
    s = datasets.load("digits")
    model = forwardpass.load("digits")
    pngs = [datasets.digit_png(x) for x in s.X_test]
    from_images = [a["label"] for a in model.predict(pngs)]
    from_pixels = [a["label"] for a in model.predict(s.X_test.astype(np.float32))]
    assert from_images == from_pixels  # the PNG path loses nothing
    accuracy = np.mean(np.asarray(from_images) == s.y_test)
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(yaml.safe_load((demo_repo / "digits" / "model.yaml").read_text())["metrics"]["accuracy"])


def test_breast_cancer_held_out_accuracy(demo_repo):
    s = datasets.load("breast-cancer")
    answers = forwardpass.load("breast-cancer").predict([dict(zip(s.feature_names, x)) for x in s.X_test])
    assert np.mean([a["label"] for a in answers] == s.y_test) >= 0.95


def test_diabetes_interval_coverage(demo_repo):
    s = datasets.load("diabetes")
    answers = forwardpass.load("diabetes").predict([dict(zip(s.feature_names, x)) for x in s.X_test])
    covered = np.mean([a["low"] <= y <= a["high"] for a, y in zip(answers, s.y_test)])
    assert answers[0]["level"] == 0.9
    assert 0.85 <= covered <= 0.95


def test_iris(demo_repo):
    s = datasets.load("iris")
    answers = forwardpass.load("iris").predict(s.X_test.astype(np.float32))
    assert np.mean([a["label"] for a in answers] == s.y_test) >= 0.9


@pytest.mark.skipif(importlib.util.find_spec("silero_vad") is None, reason="silero-vad not installed")
def test_silero_vad_runs_stateful_windows(demo_repo):
    model = forwardpass.load("silero-vad")
    state, context = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32)
    rng = np.random.default_rng(0)
    for _ in range(3):
        window = rng.normal(0, 0.1, (1, 512)).astype(np.float32)
        out = model.predict({"input": window, "state": state, "context": context, "sr": np.array(16000, np.int64)})
        state, context = out["stateN"], out["contextN"]
        np.testing.assert_array_equal(context, window[:, -64:])  # the next window's context: this one's end
        assert 0 <= float(out["output"][0, 0]) <= 1
