"""Repository: names, versions and policies, load/unload/reload, metadata checks at load."""

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from fixtures import iris_like_config, linear_model, write_model

from forwardpass import (
    InvalidModelName,
    ModelConfigError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    Repository,
)
from forwardpass.repository import check_name


@pytest.fixture
def repo(tmp_path):
    write_model(tmp_path, "clf", iris_like_config(), linear_model(4, 3, seed=1), version=1)
    write_model(tmp_path, "clf", iris_like_config(), linear_model(4, 3, seed=2), version=2)
    return Repository(tmp_path)


@pytest.mark.parametrize("name", ["../etc", "a/b", "a\\b", "..", ".hidden", "", "a..b", "x" * 200, "a b"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(InvalidModelName):
        check_name(name)


def test_names_and_versions(repo, tmp_path):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "clf" / "7").mkdir()  # no model.onnx: not a version
    assert repo.names() == ["clf"]
    assert repo.versions("clf") == [1, 2]


def test_unknown_model_and_version(repo):
    with pytest.raises(ModelNotFound) as unknown:
        repo.load("nope")
    # Triton's wording, which clients match; neither the folder nor the other models' names
    assert unknown.value.message == "Request for unknown model: 'nope' is not found"
    with pytest.raises(ModelNotFound, match="no version 9"):
        repo.load("clf", 9)
    with pytest.raises(InvalidModelName):
        repo.load("../clf")


def test_latest_policy_serves_newest(repo):
    model = repo.load("clf")
    assert model.version == 2
    assert repo.loaded() == {"clf": [2]}
    assert repo.get("clf").version == 2
    with pytest.raises(ModelNotReady):
        repo.get("clf", 1)


@pytest.mark.parametrize(("policy", "served"), [({"latest": 2}, [1, 2]), ("all", [1, 2]), ({"specific": [1]}, [1])])
def test_version_policies(repo, tmp_path, policy, served):
    (tmp_path / "clf" / "model.yaml").write_text(yaml.safe_dump(iris_like_config(version_policy=policy)))
    repo.load("clf")
    assert repo.loaded()["clf"] == served


def test_explicit_version_and_unload(repo):
    assert repo.load("clf", 1).version == 1
    repo.load("clf", 2)
    repo.unload("clf", 1)
    assert repo.loaded() == {"clf": [2]}
    repo.unload("clf")
    assert repo.loaded() == {}
    with pytest.raises(ModelNotReady, match="not loaded"):
        repo.get("clf")


def test_reload_picks_up_new_version_and_old_object_keeps_working(repo, tmp_path):
    old = repo.load("clf")
    write_model(tmp_path, "clf", iris_like_config(), linear_model(4, 3, seed=3), version=3)
    assert repo.reload("clf") == [3]
    new = repo.get("clf")
    assert new.version == 3 and old.version == 2
    x = np.ones((1, 4), np.float32)
    assert old.predict(x)[0]["label"] in "abc"  # an in-flight holder of the old version still runs


def test_status(repo, tmp_path):
    write_model(tmp_path, "broken", iris_like_config(labels=["a", "b"]), linear_model(4, 3))
    errors = repo.load_all()
    assert list(errors) == ["broken"] and "2 labels" in errors["broken"]
    states = {(s.name, s.version): s.state for s in repo.status()}
    assert states == {("broken", 1): "UNAVAILABLE", ("clf", 1): "UNLOADED", ("clf", 2): "READY"}
    with pytest.raises(ModelNotReady, match="2 labels"):
        repo.get("broken", 1)


def test_missing_repository_folder(tmp_path):
    with pytest.raises(Exception, match="not a folder"):
        Repository(tmp_path / "nope")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, 4], "features": ["a", "b", "c", "d"]}]},
         "declared FP64, but the model has FP32; set datatype: FP32"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 5], "features": list("abcde")}]},
         "declared with shape \\[-1, 5\\], but the model has \\[-1, 4\\]"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4], "features": list("abcd")}]},
         "'x' is not in the model"),
        ({"outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]}]}, "'scores' is not in the model"),
        ({"post": {"kind": "classification", "output": "nope"}}, "post.output 'nope' is not a model output"),
        ({"post": {"kind": "classification", "threshold": 0.5}}, "binary classifiers only"),
    ],
)
def test_model_yaml_must_match_the_onnx_file(tmp_path, change, match):
    write_model(tmp_path, "m", iris_like_config(**change), linear_model(4, 3))
    with pytest.raises(ModelLoadError, match=match):
        Repository(tmp_path).load("m")


def test_undeclared_model_input_is_an_error(tmp_path):
    from fixtures import token_model

    config = {"task": "custom", "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}]}
    write_model(tmp_path, "m", config, token_model(10))
    with pytest.raises(ModelLoadError, match="needs input\\(s\\) \\['attention_mask'\\]"):
        Repository(tmp_path).load("m")


def test_broken_yaml_and_corrupt_onnx(tmp_path):
    write_model(tmp_path, "m", iris_like_config(), linear_model(4, 3))
    (tmp_path / "m" / "model.yaml").write_text("task: nope\n")
    with pytest.raises(ModelConfigError, match="model.yaml: task"):
        Repository(tmp_path).load("m")
    (tmp_path / "m" / "model.yaml").write_text(yaml.safe_dump(iris_like_config()))
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelLoadError, match="could not load"):
        Repository(tmp_path).load("m")


def test_labels_file_and_escape(tmp_path):
    write_model(tmp_path, "m", iris_like_config(labels="labels.txt"), linear_model(4, 3))
    (tmp_path / "m" / "labels.txt").write_text("x\ny\nz\n")
    assert Repository(tmp_path).load("m").labels == ["x", "y", "z"]
    (tmp_path / "m" / "model.yaml").write_text(yaml.safe_dump(iris_like_config(labels="../secret.txt")))
    with pytest.raises(ModelConfigError, match="outside the model folder"):
        Repository(tmp_path).load("m")


def test_missing_execution_provider_is_named(tmp_path):
    write_model(tmp_path, "m", iris_like_config(providers=["CUDAExecutionProvider"]), linear_model(4, 3))
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        Repository(tmp_path).load("m")


def test_threads_auto_picks_one_for_a_tiny_model_and_config_overrides(tmp_path):
    write_model(tmp_path, "auto", iris_like_config(), linear_model(4, 3))
    write_model(tmp_path, "two", iris_like_config(threads={"intra_op": 2}), linear_model(4, 3))
    repo = Repository(tmp_path)
    auto = repo.load("auto")
    assert auto.runtime.intra_op == 1 and auto.runtime.probe_ms is not None
    assert repo.load("two").runtime.intra_op == 2


def test_pre_processing_that_cannot_pick_an_input_names_the_file(tmp_path):
    from fixtures import token_model

    write_model(tmp_path, "m", {"task": "custom", "pre": {"kind": "audio"}}, token_model(10))
    with pytest.raises(ModelConfigError) as info:
        Repository(tmp_path).load("m")
    assert info.value.file == str(tmp_path / "m" / "model.yaml") and info.value.loc == "pre.input"
    assert "name it with pre.input" in str(info.value)
