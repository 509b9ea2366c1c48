"""The scikit-learn importer: ONNX output equals scikit-learn's on held-out data; --trust for pickles."""

import pickle

import numpy as np
import onnxruntime as ort
import pytest
import yaml

pytest.importorskip("skl2onnx")
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from forwardpass import Repository, UntrustedFile  # noqa: E402
from forwardpass.convert.sklearn import conformal_half_width, import_sklearn, import_sklearn_file  # noqa: E402
from forwardpass.demo import datasets  # noqa: E402


def onnx_outputs(folder, X):
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": X.astype(np.float32)})


@pytest.mark.parametrize(
    ("dataset", "estimator"),
    [
        ("breast-cancer", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))),
        ("iris", RandomForestClassifier(n_estimators=20, random_state=0)),
        ("digits", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))),
    ],
)
def test_classifier_matches_sklearn(tmp_path, dataset, estimator):
    s = datasets.load(dataset)
    estimator.fit(s.X_train, s.y_train)
    folder = import_sklearn(estimator, "m", tmp_path, feature_names=s.feature_names, X_eval=s.X_test, y_eval=s.y_test)
    labels, probs = onnx_outputs(folder, s.X_test)
    np.testing.assert_array_equal(np.asarray(estimator.classes_)[np.asarray(labels).astype(int)]
                                  if labels.dtype.kind in "iu" else labels, estimator.predict(s.X_test))  # fmt: skip
    np.testing.assert_allclose(probs, estimator.predict_proba(s.X_test), atol=1e-5)
    # and through forwardpass's own path: named features in, labels out
    model = Repository(tmp_path).load("m")
    rows = [dict(zip(s.feature_names, x)) for x in s.X_test]
    answers = model.predict(rows)
    assert [a["label"] for a in answers] == list(estimator.predict(s.X_test))
    config = yaml.safe_load((folder / "model.yaml").read_text())
    assert config["labels"] == [str(c) for c in estimator.classes_]
    assert config["inputs"][0]["features"] == s.feature_names
    assert config["metrics"]["accuracy"] == pytest.approx(estimator.score(s.X_test, s.y_test))


def test_regressor_matches_sklearn_and_gets_a_conformal_interval(tmp_path):
    s = datasets.load("diabetes")
    estimator = make_pipeline(StandardScaler(), Ridge()).fit(s.X_train, s.y_train)
    folder = import_sklearn(estimator, "reg", tmp_path, feature_names=s.feature_names, X_calib=s.X_calib, y_calib=s.y_calib, level=0.8,
                            X_eval=s.X_test, y_eval=s.y_test)  # fmt: skip
    (values,) = onnx_outputs(folder, s.X_test)
    np.testing.assert_allclose(values.ravel(), estimator.predict(s.X_test), rtol=1e-4, atol=1e-3)
    config = yaml.safe_load((folder / "model.yaml").read_text())
    residuals = np.abs(s.y_calib - estimator.predict(s.X_calib))
    assert config["post"]["interval"]["level"] == 0.8
    assert config["post"]["interval"]["conformal"] == pytest.approx(conformal_half_width(residuals, 0.8), rel=1e-4)
    answer = Repository(tmp_path).load("reg").predict(dict(zip(s.feature_names, s.X_test[0])))
    assert answer["high"] - answer["value"] == pytest.approx(config["post"]["interval"]["conformal"])


def test_conformal_half_width_rank():
    residuals = np.arange(1, 20, dtype=float)  # 19 values: rank ceil(20 * 0.9) = 18
    assert conformal_half_width(residuals, 0.9) == 18
    with pytest.raises(Exception, match="too few"):
        conformal_half_width(np.arange(5.0), 0.9)


def test_new_import_becomes_the_next_version(tmp_path):
    s = datasets.load("iris")
    clf = LogisticRegression(max_iter=2000).fit(s.X_train, s.y_train)
    import_sklearn(clf, "iris", tmp_path)
    import_sklearn(clf, "iris", tmp_path)
    assert Repository(tmp_path).versions("iris") == [1, 2]


def test_pickles_need_trust(tmp_path):
    s = datasets.load("iris")
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(LogisticRegression(max_iter=2000).fit(s.X_train, s.y_train)))
    with pytest.raises(UntrustedFile, match="arbitrary code.*--trust"):
        import_sklearn_file(path, "iris", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    (tmp_path / "repo").mkdir()
    import_sklearn_file(path, "iris", tmp_path / "repo", trust=True, feature_names=s.feature_names)
    assert Repository(tmp_path / "repo").load("iris").predict(list(s.X_test[0]))["label"] == s.y_test[0]
