"""The prediction log's rows and files, and feedback's judgement of them (monitoring/predictions.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from forwardpass.errors import InvalidInput
from forwardpass.monitoring.predictions import Answer, PredictionLog, Quality, read_log
from forwardpass.pipeline.answers import ClassificationAnswers, RegressionAnswers

pq = pytest.importorskip("pyarrow.parquet")


class Post:
    """A model's post-processing, as Answer reads it: the real answer types of pipeline/answers.py."""

    def __init__(self, output: str, labels: list[str] | None = None, threshold: float | None = None):
        self.output, self.labels, self.threshold = output, labels, threshold

    def postprocess(self, outputs):
        scores = outputs[self.output]
        if self.labels is None:
            return RegressionAnswers(scores.reshape(-1), None, None, None)
        return ClassificationAnswers(scores, np.array(self.labels), self.labels, 2, self.threshold)


def _log(tmp_path, answer: Answer, **settings) -> PredictionLog:
    return PredictionLog(tmp_path / "predictions" / "m", "m", 3, answer, 1.0, settings.pop("max_bytes", 2**30),
                         **settings)  # fmt: skip


def test_a_regression_log_keeps_values_and_feedback_gives_the_mean_absolute_error(tmp_path):
    log = _log(tmp_path, Answer(Post("y")))
    log.add("a", "k1", 0.002, 2, {"x": np.array([[1.0], [2.0]], np.float32)}, {"y": np.array([[10.0], [20.0]])})
    log.add("b", None, 0.001, 1, [{"x": 3}], {"y": np.array([30.0])})
    log.flush()
    rows = read_log(log.folder).to_pylist()
    assert [(r["id"], r["row"], r["value"]) for r in rows] == [("a", 0, 10.0), ("a", 1, 20.0), ("b", 0, 30.0)]
    assert rows[0]["inputs"] == '{"x":[1.0]}' and rows[2]["inputs"] == '{"x":3}' and rows[0]["version"] == 3
    quality = Quality(tmp_path / "quality.sqlite", tmp_path / "predictions")
    found = quality.add("m", "regression", ["a", "b"], [[11, 18], 30])
    assert found["mean_absolute_error"] == pytest.approx(1.0) and found["accuracy"] is None
    with pytest.raises(InvalidInput) as exc:
        quality.add("m", "regression", ["b"], ["thirty"])
    assert exc.value.loc == ("labels", 0)
    assert quality.series("m", by="day")[0]["mean_absolute_error"] == pytest.approx(1.0)
    quality.close()


def test_a_classification_label_matches_by_name_or_class_index_and_row_counts_must_agree(tmp_path):
    log = _log(tmp_path, Answer(Post("p", ["cat", "dog"])))
    log.add("r", None, 0.0, 2, {"x": np.zeros((2, 1))}, {"p": np.array([[0.9, 0.1], [0.2, 0.8]])})
    log.flush()
    quality = Quality(tmp_path / "quality.sqlite", tmp_path / "predictions")
    assert quality.add("m", "classification", ["r"], [["cat", 1]])["accuracy"] == 1.0
    found = quality.add("m", "classification", ["r"], ["cat"])  # two rows were logged: one label is not enough
    assert found["matched"] == 0 and "2 labels" in found["unmatched"][0]["reason"]
    assert quality.add("m", "classification", ["r"], [["dog", "dog"]])["accuracy"] == 0.5
    assert quality.summary(max_age=0)[0]["labels"] == 2  # the same rows, labelled again: replaced, not added
    quality.close()


def test_files_rotate_by_rows_and_the_oldest_go_past_the_size_bound(tmp_path):
    log = _log(tmp_path, Answer(object()), rows_per_file=4, max_bytes=12_000)  # no post-processing: no answer
    for i in range(60):
        log.add(f"id{i}", None, 0.0, 1, {"x": np.full((1, 64), i, np.float32)}, {"y": np.zeros((1, 2))})
    log.flush()
    files = sorted(log.folder.glob("*.parquet"))
    assert log.written == 60 and 1 < len(files) < 15
    assert sum(f.stat().st_size for f in files) <= 12_000 + files[-1].stat().st_size
    assert pq.read_table(files[-1])["id"].to_pylist()[-1] == "id59"  # the newest rows stay
    assert not list(log.folder.glob(".*"))  # no file left half-written


def test_feedback_refuses_what_it_cannot_read():
    quality = Quality.__new__(Quality)
    for ids, labels, loc in ((None, [], ("ids",)), (["a"], ["x", "y"], ("labels",)), ([{"a": 1}], ["x"], ("ids", 0)),
                             (["a"], [None], ("labels", 0)), (["a"], [[]], ("labels", 0))):  # fmt: skip
        with pytest.raises(InvalidInput) as exc:
            Quality.add(quality, "m", "classification", ids, labels)
        assert exc.value.loc == loc


def test_a_reused_id_is_its_newest_request_a_key_labels_its_own_and_whole_floats_are_class_numbers(tmp_path):
    log = _log(tmp_path, Answer(Post("p", ["cat", "dog"], threshold=0.3)))  # dog from 0.3: the served answer
    log.add("x", "alice", 0.0, 3, {"x": np.zeros((3, 1))}, {"p": np.array([[0.9, 0.1]] * 3)})
    log.flush()
    time.sleep(0.01)
    log.add("x", "alice", 0.0, 1, {"x": np.zeros((1, 1))}, {"p": np.array([[0.6, 0.4]])})  # the id again: 1 row
    log.add("x", "bob", 0.0, 1, {"x": np.zeros((1, 1))}, {"p": np.array([[0.9, 0.1]])})
    log.flush()
    quality = Quality(tmp_path / "quality.sqlite", tmp_path / "predictions")
    assert quality.add("m", "classification", ["x"], [[0, 0, 0]], key="alice")["matched"] == 0  # the old request
    assert quality.add("m", "classification", ["x"], [1.0], key="alice")["accuracy"] == 1.0  # dog (0.4 >= 0.3)
    assert quality.add("m", "classification", ["x"], ["cat"], key="bob")["accuracy"] == 1.0
    assert sorted(r["accuracy"] for r in quality.series("m")) == [1.0]  # bob's label did not replace alice's
    assert quality.summary(max_age=0)[0]["labels"] == 2
    with pytest.raises(InvalidInput) as exc:
        quality.add("m", "classification", ["x"], [float("nan")], key="alice")
    assert exc.value.loc == ("labels", 0)
    quality.close()
