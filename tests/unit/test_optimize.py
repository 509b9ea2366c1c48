"""forwardpass optimize (issue 18): variants written as versions, measured, guarded, one recommended, promoted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("onnxruntime.quantization")
pytest.importorskip("matplotlib")
onnx = pytest.importorskip("onnx")


@pytest.fixture
def repo(demo_repo: Path, tmp_path: Path) -> Path:
    for name in ("digits", "breast-cancer"):
        shutil.copytree(demo_repo / name, tmp_path / name)
    return tmp_path


def test_quantized_variants_are_new_versions_that_load_and_the_report_recommends_one(repo):
    from forwardpass import Repository
    from forwardpass.optimize import optimize

    seen: dict[str, tuple[int, int]] = {}
    report = optimize(repo, "digits", ["dynamic-int8", "int4", "graph"], rounds=1,
                      progress=lambda stage, done, total: seen.__setitem__(stage.split(" (")[0], (done, total)))
    assert [r.variant for r in report.rows] == ["original", "dynamic-int8", "int4", "graph"]
    assert seen["making variants"] == (3, 3) and all(done == total for done, total in seen.values()) and len(seen) == 3
    assert [r.version for r in report.rows] == [1, 2, 3, 4]  # never over a version
    ops = {v: {n.op_type for n in onnx.load(str(repo / "digits" / str(v) / "model.onnx")).graph.node} for v in (2, 3)}
    assert "MatMulInteger" in ops[2] and "MatMulNBits" in ops[3]
    assert all(r.verdict in ("accepted", "flagged", "rejected") and r.p50_ms[1] > 0 and r.p99_ms[32] >= r.p50_ms[32]
               for r in report.rows)  # fmt: skip
    assert sum(r.variant == report.recommended for r in report.rows) == 1
    assert report.row("dynamic-int8").quality["metric"] == "accuracy"  # the demo's labelled held-out split
    # not promoted: the served version is pinned where it was (a `latest` policy would serve version 4 now)
    assert yaml.safe_load((repo / "digits" / "model.yaml").read_text())["version_policy"] == {"specific": [1]}
    assert Repository(repo).selected_versions("digits") == [1]
    for version in (2, 3, 4):  # every variant serves through the engine, with the model's pre/post-processing
        answer = Repository(repo).load("digits", version).predict({"input": np.zeros((1, 64), np.float32)})
        assert answer is not None
    folder = repo / "digits" / "optimize"
    doc = json.loads((folder / "report.json").read_text())
    assert doc["recommended"] == report.recommended and len(doc["rows"]) == 4
    assert (folder / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (folder / "report.md").read_text()
    assert f"**Recommended: {report.recommended}**" in text and ("avx" in text or "x86_64" in text)
    # ONNX Runtime's floor for a call (an Identity graph), timed with them, is in the report and in the JSON
    assert set(report.floor_ms) == {1, 32} and 0 < report.floor_ms[32] and doc["floor_ms"]["32"] == report.floor_ms[32]
    assert "one-node graph (Identity)" in text


def test_the_guard_rejects_a_variant_past_the_allowed_drop(repo, monkeypatch):
    from forwardpass.optimize import optimize, variants

    def damaged(source: Path, target: Path, X) -> str:  # a real variant, with its first weight matrix halved
        model = onnx.load(str(source))
        first = next(t for t in model.graph.initializer if len(t.dims) == 2)
        array = onnx.numpy_helper.to_array(first) * 0.3
        first.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), first.name))
        onnx.save(model, str(target))
        return "weights scaled by 0.3"

    monkeypatch.setitem(variants.METHODS, "damaged", (damaged, None))
    report = optimize(repo, "digits", ["damaged"], rounds=1, max_drop=0.01)
    row = report.row("damaged")
    assert row.quality["drop"] > 0.01 and row.verdict == "rejected"
    assert report.recommended == "original"
    assert "Nothing passed the guard." in (repo / "digits" / "optimize" / "report.md").read_text()


def test_promote_changes_what_the_server_answers_with(repo, serve, cli, monkeypatch):
    import forwardpass.optimize

    # any accepted variant wins (on a busy machine dynamic int8 need not be 1.10x this tiny MLP's speed)
    monkeypatch.setattr(forwardpass.optimize, "MIN_GAIN", 0.0)
    result = cli("optimize", "digits", "-r", str(repo), "--quantize", "dynamic-int8", "--rounds", "1", "--promote")
    assert result.returncode == 0, result.stderr
    assert "Recommended:" in result.stdout
    served = yaml.safe_load((repo / "digits" / "model.yaml").read_text())["version_policy"]["specific"]
    report = json.loads((repo / "digits" / "optimize" / "report.json").read_text())
    winner = next(r["version"] for r in report["rows"] if r["variant"] == report["recommended"])
    assert winner == 2 and served == [2] and report["promoted"]
    app = serve(repo)
    answer = app.post("/v2/models/digits/infer", json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                                                  "data": [0.0] * 64}]})  # fmt: skip
    assert answer.status_code == 200 and answer.json()["model_version"] == str(winner)


def test_a_model_without_matmul_says_quantization_does_not_apply(repo):
    from forwardpass.optimize import optimize

    report = optimize(repo, "breast-cancer", ["dynamic-int8", "int4"], rounds=1)
    for method in ("dynamic-int8", "int4"):
        row = report.row(method)
        assert row.version is None and row.verdict == "not applicable" and "LinearClassifier" in row.described
    assert report.recommended == "original" and sorted(p.name for p in (repo / "breast-cancer").iterdir()
                                                       if p.name.isdigit()) == ["1"]  # fmt: skip


def test_validation_rows_from_a_file_without_labels_measure_agreement(repo, tmp_path):
    from forwardpass.optimize import optimize

    data = tmp_path / "rows.npz"
    np.savez(data, X=np.random.default_rng(0).uniform(0, 16, (64, 64)).astype(np.float32))
    report = optimize(repo, "digits", ["graph"], data=data, rounds=1)
    assert report.row("graph").quality["metric"] == "agreement" and report.row("graph").quality["value"] == 1.0


def test_pruning_removes_hidden_units_and_refits_the_next_layer(repo):
    from forwardpass import Repository
    from forwardpass.optimize import optimize

    report = optimize(repo, "digits", ["prune-50", "prune-75"], rounds=1)
    shapes = {}
    for version in (2, 3):
        model = onnx.load(str(repo / "digits" / str(version) / "model.onnx"))
        shapes[version] = sorted(tuple(t.dims) for t in model.graph.initializer if len(t.dims) == 2)
    assert shapes[2] == [(1, 10), (1, 32), (32, 10), (64, 32)]  # 64 hidden units -> 32: tensors cut, not zeroed
    assert shapes[3] == [(1, 10), (1, 16), (16, 10), (64, 16)]
    assert report.row("prune-50").size_bytes < report.row("original").size_bytes
    assert "64 -> 32 units" in report.row("prune-50").described
    # the refit keeps the half-size model useful: far above chance (10%), below the original
    assert 0.9 < report.row("prune-50").quality["value"] <= report.row("original").quality["value"]
    assert Repository(repo).load("digits", 2).predict({"input": np.zeros((1, 64), np.float32)}) is not None
    wrong = optimize(repo, "breast-cancer", ["prune-50"], rounds=1).row("prune-50")
    assert wrong.verdict == "not applicable" and wrong.version is None


def test_distillation_trains_a_smaller_student_that_serves_with_the_teachers_labels(repo, cli):
    from forwardpass import Repository

    result = cli("optimize", "digits", "-r", str(repo), "--distill", "32", "--distill", "0", "--rounds", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((repo / "digits" / "optimize" / "report.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["distill-32"]["version"] == 2 and rows["distill-linear"]["version"] == 3
    student = onnx.load(str(repo / "digits" / "2" / "model.onnx"))
    assert [tuple(t.dims) for t in student.graph.initializer if len(t.dims) == 2] == [(64, 32)]
    (classifier,) = [n for n in student.graph.node if n.op_type == "LinearClassifier"]  # the last layer, labels too
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in classifier.attribute}
    assert len(attrs["coefficients"]) == 32 * 10 and [s.decode() for s in attrs["classlabels_strings"]] == list("0123456789")
    assert not {n.op_type for n in student.graph.node} & {"Scaler", "Cast"}  # the input scaling folded in
    assert rows["distill-32"]["quality"]["value"] > 0.95  # a student, not noise (chance is 0.10)
    X = np.random.default_rng(0).uniform(0, 16, (8, 64)).astype(np.float32)
    model = Repository(repo).load("digits", 2)
    raw = model.run({"input": X})  # the label output is the best class's label, as the teacher's is
    assert list(raw["label"]) == [str(k) for k in raw["probabilities"].argmax(axis=1)]
    assert np.allclose(raw["probabilities"].sum(axis=1), 1, atol=1e-5)
    answer = model.predict({"input": np.zeros((1, 64), np.float32)})
    assert answer is not None
    bad = cli("optimize", "digits", "-r", str(repo), "--distill", "wide")
    assert bad.returncode == 2 and "--distill" in bad.stderr


def test_a_regression_variant_gets_a_widened_interval_that_promote_serves(demo_repo, tmp_path, monkeypatch):
    import forwardpass.optimize as opt

    shutil.copytree(demo_repo / "diabetes", tmp_path / "diabetes")
    original = yaml.safe_load((tmp_path / "diabetes" / "model.yaml").read_text())["post"]["interval"]["conformal"]
    monkeypatch.setattr(opt, "MIN_GAIN", 0.0)  # recommended whatever the timings: what is checked is the interval
    report = opt.optimize(tmp_path, "diabetes", ["distill-linear"], rounds=1, promote=True)
    assert report.promoted and report.recommended == "distill-linear"
    base, student = report.row("original").interval, report.row("distill-linear").interval
    assert base["half_width"] == pytest.approx(original) and base["widened_by"] == 0
    # the student is not the teacher to the last bit: its interval is wider by what separates them
    assert student["widened_by"] > 0 and student["half_width"] == pytest.approx(original + student["widened_by"])
    assert 0.8 < student["coverage"] <= 1
    recorded = json.loads((tmp_path / "diabetes" / str(report.row("distill-linear").version) / "variant.json").read_text())
    assert recorded["interval"] == student
    served = yaml.safe_load((tmp_path / "diabetes" / "model.yaml").read_text())
    assert served["post"]["interval"]["conformal"] == pytest.approx(student["half_width"])
    assert "| distill-linear |" in (report.folder / "report.md").read_text().split("Intervals")[1]


def test_fp16_that_runs_no_faster_is_labelled_size_only(repo):
    """The label follows the measured throughput (whether fp16 is faster here is a timing, for bench/: on a
    model this small one round can go either way, and a CI run once did)."""
    from forwardpass.optimize import MIN_GAIN, optimize

    report = optimize(repo, "digits", ["fp16"], rounds=1)
    row = report.row("fp16")
    assert row.size_bytes < report.row("original").size_bytes and row.quality["drop"] < 0.01
    assert row.size_only == (row.throughput < MIN_GAIN * report.row("original").throughput)
    text = (repo / "digits" / "optimize" / "report.md").read_text()
    assert ("(size only: no faster on this CPU)" in text) == row.size_only


def test_static_quantization_calibrates_the_activations_of_an_sklearn_graph(repo):
    """skl2onnx's Scaler leaves its output untyped; typed again after pre-processing, the calibrators see every
    activation: Entropy has a histogram to build (it failed before), and MinMax quantizes the hidden layer's input."""
    from forwardpass.optimize import optimize

    report = optimize(repo, "digits", ["static-int8", "static-int8-entropy"], rounds=1)
    for method in ("static-int8", "static-int8-entropy"):
        row = report.row(method)
        assert row.version is not None and row.verdict in ("accepted", "flagged"), row.described
        graph = onnx.load(str(repo / "digits" / str(row.version) / "model.onnx")).graph
        quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
        assert "variable" in quantized and "next_activations" in quantized  # the Scaler's output, the hidden layer's
