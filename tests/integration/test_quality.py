"""The prediction log and a model's quality: served requests sampled to Parquet, labels sent later joined with
them, accuracy over time as a number (monitoring/predictions.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import yaml
from fixtures import copy_models

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")
datasets = pytest.importorskip("sklearn.datasets")

LABELS = ["setosa", "versicolor", "virginica"]


def _logged_iris(demo_repo, tmp_path, **log):
    repo = copy_models(demo_repo, tmp_path / "models", "iris")
    path = repo / "iris" / "model.yaml"
    config = yaml.safe_load(path.read_text())
    config["prediction_log"] = {"rate": 1.0, **log}
    path.write_text(yaml.safe_dump(config))
    return repo


def _infer(app, rows: np.ndarray, request_id: str | None = None, headers=None) -> dict:
    body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.astype(np.float32).ravel().tolist()}]}  # fmt: skip
    if request_id is not None:
        body["id"] = request_id
    response = app.post("/v2/models/iris/infer", json=body, headers=headers or {})
    assert response.status_code == 200, response.text
    return response.json()


def _predicted(answer: dict) -> list[str]:
    scores = next(o for o in answer["outputs"] if o["name"] == "probabilities")
    return [LABELS[i] for i in np.asarray(scores["data"]).reshape(scores["shape"]).argmax(axis=1)]


def test_feedback_on_a_known_mix_of_right_and_wrong_answers_gives_their_accuracy(demo_repo, tmp_path, serve):
    state = tmp_path / "state"
    app = serve(_logged_iris(demo_repo, tmp_path), state_dir=state)
    x = datasets.load_iris().data
    ids, labels = [], []
    for i in range(40):  # 40 one-row requests with our ids: 30 labelled with the answer given, 10 with another class
        predicted = _predicted(_infer(app, x[i * 3 : i * 3 + 1], f"req-{i}"))[0]
        ids.append(f"req-{i}")
        labels.append(predicted if i < 30 else LABELS[(LABELS.index(predicted) + 1) % 3])
    # a request of 4 rows without an id: the server names it in the response; its labels are one per row
    answer = _infer(app, x[120:124])
    assert answer["id"], answer
    predicted = _predicted(answer)
    ids.append(answer["id"])
    labels.append([predicted[0], predicted[1], "setosa" if predicted[2] != "setosa" else "virginica", predicted[3]])

    found = app.post("/v2/models/iris/feedback", json={"ids": ids + ["never-sent"], "labels": labels + ["setosa"]})
    assert found.status_code == 200, found.text
    found = found.json()
    assert found["matched"] == 41 and found["labels"] == 44 and found["unmatched"][0]["id"] == "never-sent"
    assert found["accuracy"] == pytest.approx(33 / 44)  # 30 + 3 right of 40 + 4

    # the same labels again count once; a Parquet file of labels works as the JSON does
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ids[:30], "label": labels[:30]}), buffer)
    again = app.post("/v2/models/iris/feedback", content=buffer.getvalue(),
                     headers={"content-type": "application/vnd.apache.parquet"})  # fmt: skip
    assert again.status_code == 200 and again.json()["accuracy"] == 1.0, again.text

    quality = app.get("/v2/models/iris/quality").json()
    assert quality["labels"] == 44 and quality["accuracy"] == pytest.approx(33 / 44), quality
    assert quality["series"][0]["time"].endswith(":00Z") and quality["series"][0]["version"] == 1
    metrics = app.get("/metrics").text
    assert 'forwardpass_model_accuracy{model="iris",version="1"} 0.75' in metrics
    assert 'forwardpass_feedback_labels_total{model="iris",version="1"} 44.0' in metrics

    # the log itself: one row per instance, with the key id, version and latency, readable as Parquet
    files = sorted((state / "predictions" / "iris").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.num_rows == 44
    row = table.filter(pa.compute.equal(table["id"], "req-3")).to_pylist()[0]
    assert row["version"] == 1 and row["key"] == "anonymous" and row["latency_ms"] > 0 and row["row"] == 0
    assert row["prediction"] in LABELS and len(yaml.safe_load(row["inputs"])["input"]) == 4


def test_feedback_names_what_is_wrong_and_a_model_without_a_log_says_so(demo_repo, tmp_path, serve):
    app = serve(copy_models(demo_repo, tmp_path / "models", "iris"), state_dir=tmp_path / "state")
    bad = app.post("/v2/models/iris/feedback", json={"ids": ["a", "b"], "labels": ["setosa"]})
    assert bad.status_code == 400 and "labels" in bad.text, bad.text
    buffer = io.BytesIO()  # a small file of many rows: refused from its footer, before it is read
    pq.write_table(pa.table({"id": ["a"] * 100_001, "label": ["setosa"] * 100_001}), buffer)
    big = app.post("/v2/models/iris/feedback", content=buffer.getvalue())
    assert big.status_code == 400 and "at most 100000" in big.text, big.text
    for body in (b"PAR1 not parquet", b"[1, 2]"):
        assert app.post("/v2/models/iris/feedback", content=body).status_code == 400
    answer = _infer(app, datasets.load_iris().data[:1])
    assert "id" not in answer  # no log: the response is Triton's, unchanged
    found = app.post("/v2/models/iris/feedback", json={"ids": ["a"], "labels": ["setosa"]}).json()
    assert found["matched"] == 0 and "prediction_log" in found["hint"]


def test_predict_requests_are_logged_with_their_caller_and_the_disk_use_stays_bounded(demo_repo, tmp_path, serve):
    from forwardpass.monitoring.keys import create_key

    keys = tmp_path / "keys.yaml"
    secret, _ = create_key(keys, "pro", key_id="alice")
    state = tmp_path / "state"
    app = serve(_logged_iris(demo_repo, tmp_path, rows_per_file=5, max_mb=0.02), state_dir=state, keys_file=keys)
    x = datasets.load_iris().data
    names = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
    for i in range(0, 150, 5):
        instances = [dict(zip(names, map(float, r))) for r in x[i : i + 5]]
        response = app.post("/v1/models/iris:predict", json={"instances": instances},
                            headers={"authorization": f"Bearer {secret}"})  # fmt: skip
        assert response.status_code == 200 and response.json()["id"], response.text
    last = response.json()
    labels = {"ids": [last["id"]], "labels": [[p["label"] for p in last["predictions"]]]}
    assert app.post("/v2/models/iris/feedback", json=labels).json()["matched"] == 0  # not alice: her answers stay hers
    mine = app.post("/v2/models/iris/feedback", json=labels, headers={"authorization": f"Bearer {secret}"}).json()
    assert mine["matched"] == 1 and mine["accuracy"] == 1.0, mine
    assert 'forwardpass_feedback_correct_total{model="iris",version="1"} 5.0' in app.get("/metrics").text
    files = sorted((state / "predictions" / "iris").glob("*.parquet"))
    assert 1 < len(files) < 30  # rotated, and the oldest deleted past max_mb
    assert sum(f.stat().st_size for f in files[:-1]) <= 0.02 * 2**20
    newest = pq.read_table(files[-1]).to_pylist()
    assert newest[-1]["key"] == "alice" and newest[-1]["row"] == 4 and newest[-1]["class_index"] in (0, 1, 2)
