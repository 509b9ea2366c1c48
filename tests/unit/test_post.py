"""Post-processing: softmax, top-k, binary threshold, regression intervals, passthrough."""

import numpy as np
import pytest
from fixtures import linear_model, quantile_model, write_model

from forwardpass import Repository
from forwardpass.config import ClassificationPost, Interval, RegressionPost
from forwardpass.pipeline.post import Classify, Regress, softmax
from forwardpass.runtime import TensorInfo

OUT = [TensorInfo("probabilities", "FP32", (-1, 2))]


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]], np.float32))
    np.testing.assert_allclose(p, [[0.5, 0.5], [0.25, 0.75]], rtol=1e-6)


def test_threshold_moves_the_decision():
    probs = np.array([[0.4, 0.6], [0.2, 0.8]], np.float32)
    argmax = Classify(ClassificationPost(kind="classification"), OUT, ["no", "yes"], "f")([probs])
    assert [a["label"] for a in argmax] == ["yes", "yes"]
    strict = Classify(ClassificationPost(kind="classification", threshold=0.7), OUT, ["no", "yes"], "f")([probs])
    assert [a["label"] for a in strict] == ["no", "yes"]
    assert strict[0]["probability"] == pytest.approx(0.4)


def test_labels_default_to_indices_and_top_k_is_capped():
    answers = Classify(ClassificationPost(kind="classification", top_k=5), OUT, None, "f")([np.array([[0.3, 0.7]])])
    assert answers[0]["label"] == "1" and len(answers[0]["top_k"]) == 2


def test_regression_conformal_interval():
    post = Regress(RegressionPost(kind="regression", interval=Interval(level=0.9, conformal=2.5)),
                   [TensorInfo("variable", "FP32", (-1, 1))], "f")  # fmt: skip
    assert post([np.array([[10.0], [0.0]], np.float32)]) == [
        {"value": 10.0, "low": 7.5, "high": 12.5, "level": 0.9},
        {"value": 0.0, "low": -2.5, "high": 2.5, "level": 0.9},
    ]


def test_regression_quantile_outputs(tmp_path):
    config = {"task": "regression",
              "post": {"kind": "regression", "output": "value",
                       "interval": {"level": 0.9, "low": "q05", "high": "q95"}}}  # fmt: skip
    write_model(tmp_path, "q", config, quantile_model())
    model = Repository(tmp_path).load("q")
    assert model.predict(np.array([1, 2, 3], np.float32)) == {"value": 6.0, "low": 5.0, "high": 8.0, "level": 0.9}
    config["post"]["interval"]["high"] = "q99"
    write_model(tmp_path, "q", config, quantile_model())
    with pytest.raises(Exception, match="'q99' is not a model output"):
        Repository(tmp_path).load("q")


def test_regression_without_interval_and_passthrough(tmp_path):
    write_model(tmp_path, "r", {"task": "regression"}, linear_model(4, 1, out_name="variable"))
    write_model(tmp_path, "p", {"task": "custom"}, linear_model(4, 2))
    repo = Repository(tmp_path)
    assert set(repo.load("r").predict(np.ones(4, np.float32))) == {"value"}
    raw = repo.load("p").predict(np.ones((3, 4), np.float32))
    assert list(raw) == ["logits"] and raw["logits"].shape == (3, 2)
    assert repo.load("p").predict(np.ones(4, np.float32))["logits"].shape == (2,)
