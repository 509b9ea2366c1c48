"""Drift on a served model: its recent inputs and answers against the reference its import wrote."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import copy_models

from forwardpass.monitoring.drift import PROFILER

datasets = pytest.importorskip("sklearn.datasets")


def _send(app, rows: np.ndarray) -> None:
    for part in np.array_split(rows, max(1, len(rows) // 50)):
        body = {"inputs": [{"name": "input", "shape": list(part.shape), "datatype": "FP32",
                            "data": part.astype(np.float32).ravel().tolist()}]}  # fmt: skip
        assert app.post("/v2/models/iris/infer", json=body).status_code == 200
    PROFILER.wait()


@pytest.mark.parametrize("shift", [0.0, 2.5])
def test_shifted_inputs_raise_the_psi_past_the_threshold_and_flip_the_status(demo_repo, tmp_path, serve, shift):
    app = serve(copy_models(demo_repo, tmp_path / "models", "iris"))
    assert app.get("/v2/models/iris/drift").json()["status"] == "unknown"  # nothing served yet
    rows = datasets.load_iris().data.copy()
    rows[:, 2] += shift  # petal length, cm
    _send(app, rows)
    report = app.get("/v2/models/iris/drift").json()
    petal = next(f for f in report["features"] if f["name"] == "petal length (cm)")
    assert report["rows"] == 150 and report["reference_rows"] > 0
    metrics = app.get("/metrics").text
    if shift == 0:
        assert report["status"] == "ok" and report["max_psi"] < 0.1, report
        assert 'forwardpass_model_drifting{model="iris",version="1"} 0.0' in metrics
        assert all("reason" not in e for e in app.post("/v2/repository/index").json())
    else:
        assert report["status"] == "drifting" and petal["psi"] > 0.25 and petal["status"] == "drifting", report
        assert petal["ks"] > 0.5 and petal["ks_p_value"] < 1e-6
        assert report["prediction"]["psi"] > 0.25  # more flowers read as virginica
        assert 'forwardpass_model_drifting{model="iris",version="1"} 1.0' in metrics
        index = {e["version"]: e for e in app.post("/v2/repository/index").json() if e["name"] == "iris"}
        assert index["1"]["state"] == "READY" and index["1"]["reason"].startswith("drifting"), index
    assert 'forwardpass_drift_psi{feature="petal length (cm)",model="iris",version="1"}' in metrics


def test_a_model_without_a_reference_says_so(demo_repo, tmp_path, serve):
    repo = copy_models(demo_repo, tmp_path / "models", "iris")
    (repo / "iris" / "1" / "reference.json").unlink()
    app = serve(repo)
    assert app.get("/v2/models/iris/drift").json()["status"] == "no_reference"


def test_the_drift_command_judges_a_file_against_the_reference(demo_repo, tmp_path, cli):
    import csv

    rows = datasets.load_iris()
    names = list(rows.feature_names)
    for shift, code, status in ((0.0, 0, "ok"), (2.5, 1, "drifting")):
        path = tmp_path / f"shift{shift}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(names)
            for r in rows.data:
                writer.writerow([*r[:2], r[2] + shift, r[3]])
        found = cli("drift", "iris", str(path), "--json", "-r", str(demo_repo))
        assert found.returncode == code, found.stderr
        assert f'"status": "{status}"' in found.stdout and '"ks_p_value"' in found.stdout
