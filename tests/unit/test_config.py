"""model.yaml: valid configs get defaults; broken ones fail with file, field and fix."""

from pathlib import Path

import pytest

from forwardpass.config import load_config
from forwardpass.errors import ModelConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults_from_task(tmp_path):
    config = load_config(write(tmp_path, "task: classification\n"))
    assert config.post.kind == "classification"
    assert config.pre.kind == "tensor"
    assert config.threads.intra_op == "auto"
    assert config.version_policy.latest == 1
    assert load_config(write(tmp_path, "task: regression\n")).post.kind == "regression"
    assert load_config(write(tmp_path, "task: custom\n")).post.kind == "passthrough"


def test_full_config(tmp_path):
    text = """
task: classification
labels: labels.txt
inputs: [{name: x, datatype: FP32, shape: [-1, 2], features: [a, {name: b, default: 0.5}]}]
pre: {kind: tabular}
post: {kind: classification, top_k: 1, threshold: 0.7}
batching: {max_batch_size: 32, max_queue_delay_ms: 2, preferred_batch_sizes: [8, 16]}
instances: 2
cache: {enabled: true, max_bytes: 1000}
threads: {intra_op: 1, inter_op: 1, spinning: true}
graph_optimization: basic
version_policy: {specific: [1, 3]}
"""
    config = load_config(write(tmp_path, text))
    assert config.inputs[0].features[1].default == 0.5
    assert config.batching.preferred_batch_sizes == [8, 16]
    assert config.version_policy.specific == [1, 3]
    assert load_config(write(tmp_path, "task: custom\nversion_policy: all\n")).version_policy == "all"


@pytest.mark.parametrize(
    ("text", "loc", "fix"),
    [
        ("task: clasification\n", "task", "use one of the values listed"),
        ("tsk: classification\n", "task", "add 'task'"),
        ("task: custom\nbatchng: {}\n", "batchng", "did you mean 'batching'"),
        ("task: custom\npre: {kind: tabular, inptu: x}\n", "pre.inptu", "remove 'inptu'"),
        ("task: custom\npre: {kind: imag}\n", "pre", "use one of the values listed"),
        ("task: custom\ninputs: [{name: x, datatype: FP33, shape: [1]}]\n", "inputs.0.datatype", "values listed"),
        ("task: custom\ninputs: [{name: x, datatype: FP32, shape: [-2]}]\n", "inputs.0.shape.0", "correct the value"),
        ("task: custom\nbatching: {max_batch_size: 0}\n", "batching.max_batch_size", "correct the value"),
        ("task: custom\nversion_policy: {latest: 0}\n", "version_policy.latest", "correct the value"),
        ("task: regression\npost: {kind: regression, interval: {level: 0.9}}\n", "post.interval", "correct"),
        ("task: custom\nthreads: {intra_op: -1}\n", "threads.intra_op", "correct the value"),
        ("task: custom\ninputs: [{name: x, datatype: FP32, shape: [-1, 3], features: [a]}]\n", "inputs.0", "correct"),
    ],
)
def test_broken_config_names_file_field_and_fix(tmp_path, text, loc, fix):
    path = write(tmp_path, text)
    with pytest.raises(ModelConfigError) as info:
        load_config(path)
    err = info.value
    assert err.file == str(path)
    assert err.loc == loc
    assert fix in err.fix
    assert str(path) in str(err) and loc in str(err)


def test_yaml_syntax_error_gives_line(tmp_path):
    with pytest.raises(ModelConfigError) as info:
        load_config(write(tmp_path, "task: custom\ninputs: [\n"))
    assert "line" in info.value.loc and "YAML" in info.value.msg


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ModelConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- just a list\n"))
    with pytest.raises(ModelConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_tabular_needs_features_and_pre_input_must_exist(tmp_path):
    with pytest.raises(ModelConfigError, match="features"):
        load_config(write(tmp_path, "task: custom\ninputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\npre: {kind: tabular}\n"))
    with pytest.raises(ModelConfigError, match="pre.input 'y'"):
        load_config(write(tmp_path, "task: custom\ninputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\npre: {kind: image, input: y}\n"))


def test_pre_schemas_come_from_the_kinds_registry(tmp_path):
    from forwardpass import config
    from forwardpass.pipeline import kinds
    from forwardpass.pipeline.kinds.image import ImagePre

    image = load_config(write(tmp_path, "task: custom\npre: {kind: image, resize: 8, resample: box}\n")).pre
    assert type(image) is kinds.kind("image").schema is ImagePre
    assert (image.resize, image.resample.down, image.resample.up) == (8, "box", "box")
    assert not hasattr(config, "ImagePre")  # a kind's schema lives with the kind, not in config.py
