"""The command line: predict from files and JSON, tables and --json, errors without tracebacks."""

import json
import pickle
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from forwardpass.cli import app
from forwardpass.demo import datasets

runner = CliRunner()


@pytest.fixture(scope="module")
def samples(demo_repo, tmp_path_factory):
    from forwardpass.demo import write_samples

    folder = tmp_path_factory.mktemp("samples")
    write_samples(folder)
    return folder


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_predict_digit_png_json(samples):
    result = invoke("predict", "digits", str(samples / "digit-7.png"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["label"] == "7"


def test_predict_table_and_many_inputs(samples):
    result = invoke("predict", "digits", *(str(samples / f"digit-{d}.png") for d in range(10)))
    assert result.exit_code == 0
    for d in range(10):
        assert f"digit-{d}.png │ {d} " in result.output


def test_predict_csv_json_file_and_inline_json(samples):
    s = datasets.load("breast-cancer")
    result = invoke("predict", "breast-cancer", str(samples / "breast-cancer.csv"), "--json", "--top-k", "1")
    answers = json.loads(result.output)
    assert [a["label"] for a in answers] == list(s.y_test[:5])
    assert all(len(a["top_k"]) == 1 for a in answers)
    result = invoke("predict", "diabetes", str(samples / "diabetes.json"))
    assert "90% interval" in result.output
    row = json.dumps(dict(zip(datasets.load("iris").feature_names, [5.1, 3.5, 1.4, 0.2])))
    assert json.loads(invoke("predict", "iris", row, "--json").output)[0]["label"] == "setosa"


def test_models_and_demo_commands(demo_repo, tmp_path):
    result = invoke("models")
    assert result.exit_code == 0
    assert "digits" in result.output and "READY" in result.output
    result = invoke("demo", "--samples", str(tmp_path / "s"))
    assert result.exit_code == 0 and (tmp_path / "s" / "digit-0.png").is_file()


def run_cli(*args, **kwargs):
    """The installed console script in a subprocess: what a user sees, exit code included."""
    return subprocess.run([sys.executable, "-m", "forwardpass", *args], capture_output=True, text=True, **kwargs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "nope", "x.png"], "Request for unknown model: 'nope' is not found"),
        (["predict", "../etc", "x"], "invalid model name"),
        (["predict", "iris", '{"petal size": 1}'], "unknown feature"),
        (["predict", "iris", "{not json"], "not valid JSON"),
        (["predict", "iris", "hello"], "not a file, and not JSON"),
        (["predict", "iris", '{"sepal length (cm)": "abc"}'], "expected a number"),
        (["predict", "digits", "pyproject.toml"], "cannot decode image"),
        (["predict", "iris", "[]"], "at least one instance"),
    ],
)
def test_bad_input_exits_2_with_one_line(demo_repo, cli, args, message):
    result = cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_the_console_script_exits_2_with_one_line_in_a_process_of_its_own(demo_repo):
    result = run_cli("predict", "iris", "{not json")
    assert result.returncode == 2 and "not valid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr + result.stdout


def test_import_refuses_pickles_without_trust(demo_repo, tmp_path, cli):
    from sklearn.linear_model import LogisticRegression

    s = datasets.load("iris")
    path = tmp_path / "clf.pkl"
    path.write_bytes(pickle.dumps(LogisticRegression(max_iter=2000).fit(s.X_train, s.y_train)))
    repo = tmp_path / "repo"
    repo.mkdir()
    result = cli("import", "sklearn", str(path), "--name", "mine", "--repository", str(repo))
    assert result.returncode == 2 and "--trust" in result.stderr and "arbitrary code" in result.stderr
    assert not (repo / "mine").exists()
    result = cli("import", "sklearn", str(path), "--name", "mine", "--repository", str(repo), "--trust",
                 "--features", ",".join(s.feature_names))  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = cli("predict", "mine", json.dumps(dict(zip(s.feature_names, s.X_test[0]))), "--json", "-r", str(repo))
    assert json.loads(out.stdout)[0]["label"] == s.y_test[0]


def test_import_regressor_with_calibration_csv(tmp_path, cli):
    from sklearn.linear_model import Ridge

    s = datasets.load("diabetes")
    path = tmp_path / "reg.pkl"
    path.write_bytes(pickle.dumps(Ridge().fit(s.X_train, s.y_train)))
    calib = tmp_path / "calib.csv"
    calib.write_text("\n".join([",".join(s.feature_names + ["y"])] +
                               [",".join(map(str, [*x, y])) for x, y in zip(s.X_calib, s.y_calib)]))  # fmt: skip
    (tmp_path / "repo").mkdir()
    result = cli("import", "sklearn", str(path), "--name", "reg", "-r", str(tmp_path / "repo"), "--trust",
                 "--calibration", str(calib), "--target", "y")  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "repo" / "reg" / "model.yaml").read_text()
    assert "conformal" in text and "level: 0.9" in text
