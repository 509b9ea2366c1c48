"""Pre-processing kinds are a registry with traits: a new kind is one module plus one registry line, and
entrypoints ask a kind for its traits instead of comparing its name."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from fixtures import image_model, iris_like_config, linear_model, write_model

from forwardpass import ModelConfigError, Repository
from forwardpass.config import PreOptions, TensorSpec
from forwardpass.pipeline import TABLE, Plan, Preprocessor, build_pre, kinds
from forwardpass.pipeline.kinds.tabular import TabularPre

# --- a kind written the way a new one would be: its schema and its Preprocessor, one place -------------


class ScalePre(PreOptions):
    """Rows of numbers, multiplied by ``factor``."""

    kind: Literal["scale"]
    factor: float = 1.0


class Scale(Preprocessor):
    schema = ScalePre

    def __init__(self, config: ScalePre, specs: Sequence[TensorSpec], folder: Path):
        super().__init__(config, specs, folder)
        self.factor, self.input = config.factor, specs[0].name

    def is_single(self, data: Any) -> bool:
        return not isinstance(data[0], (list, tuple))

    def read_row(self, row: Any) -> Any:
        return row["x"]

    def plan(self, instances: Sequence[Any]) -> Plan:
        return Plan(len(instances), "rows", False,
                    lambda: {self.input: np.asarray(instances, np.float32) * np.float32(self.factor)})  # fmt: skip


@pytest.fixture
def scale_kind():
    kinds.register("scale", f"{__name__}:Scale")  # the one line a new kind adds, as in kinds.BUILTIN
    yield
    kinds.unregister("scale")


def scale_repo(tmp_path: Path, pre: dict[str, Any]) -> Repository:
    inputs = [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    write_model(tmp_path, "m", iris_like_config(inputs=inputs, pre=pre), linear_model(4, 3))
    return Repository(tmp_path)


def test_a_kind_registered_at_run_time_is_validated_built_and_used_by_batch(tmp_path, scale_kind):
    model = scale_repo(tmp_path, {"kind": "scale", "factor": 2}).load("m")
    assert model.pre.name == "scale" and not model.pre.takes_raw
    x = np.array([[1, 2, 3, 4], [0.5, 0, 1, 2]], np.float32)
    assert model.predict(x.tolist()) == model.predict(x * 2)
    assert model.predict([1, 2, 3, 4]) == model.predict(x[:1] * 2)[0]

    pytest.importorskip("pyarrow")
    from forwardpass.batch.io import Chunk
    from forwardpass.batch.predict import ChunkPredictor

    table, errors = ChunkPredictor(model).predict(Chunk(0, 0, [{"x": row} for row in x.tolist()]))
    assert errors == [] and table.column("label").to_pylist() == [a["label"] for a in model.predict(x * 2)]


def test_a_registered_kind_gets_the_same_config_errors(tmp_path, scale_kind):
    with pytest.raises(ModelConfigError) as info:
        scale_repo(tmp_path, {"kind": "scale", "factr": 2}).load("m")
    assert info.value.loc == "pre.factr" and "remove 'factr'" in info.value.fix
    assert info.value.file == str(tmp_path / "m" / "model.yaml")


def test_an_unregistered_kind_is_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(ModelConfigError) as info:
        scale_repo(tmp_path, {"kind": "scale"}).load("m")
    assert info.value.loc == "pre" and "'tabular', 'image', 'text', 'audio'" in info.value.msg
    assert "use one of the values listed" in info.value.fix


def test_register_refuses_a_kind_whose_schema_says_another_name():
    with pytest.raises(TypeError, match=r"kind: Literal\['other'\]"):
        kinds.register("other", Scale)
    assert "other" not in kinds.names()
    with pytest.raises(KeyError):
        kinds.kind("other")


# --- the traits of the built-in kinds ----------------------------------------------------------------

SPECS = {
    "tensor": [TensorSpec(name="input", datatype="FP32", shape=[-1, 4])],
    "tabular": [TensorSpec(name="input", datatype="FP32", shape=[-1, 2], features=["a", {"name": "b", "default": 0}])],
    "image": [TensorSpec(name="image", datatype="FP32", shape=[-1, 3, 8, 8])],
    "text": [TensorSpec(name="text", datatype="BYTES", shape=[-1, 1])],
    "audio": [TensorSpec(name="audio", datatype="FP32", shape=[-1, -1])],
}


@pytest.mark.parametrize(
    ("kind", "takes_raw", "text", "per_instance", "batch_size", "chunk_rows", "ray_rows", "required", "layouts"),
    [
        ("tensor", False, False, False, 1024, 65536, 4096, [], {}),
        ("tabular", False, False, False, 1024, 65536, 4096, ["a"], {}),
        ("image", True, False, True, 32, 256, 32, [], {"image": "NCHW"}),
        ("text", True, True, False, 64, 1024, 4096, [], {}),
        ("audio", True, False, True, 8, 64, 32, [], {}),
    ],
)
def test_traits_of_the_built_in_kinds(kind, takes_raw, text, per_instance, batch_size, chunk_rows, ray_rows,
                                      required, layouts):  # fmt: skip
    schema = kinds.kind(kind).schema
    pre = build_pre(schema.model_validate({"kind": kind}), SPECS[kind], Path("."))
    assert (pre.name, pre.takes_raw, pre.text, pre.per_instance) == (kind, takes_raw, text, per_instance)
    assert (pre.batch.batch_size, pre.batch.chunk_rows, pre.batch.ray_rows) == (batch_size, chunk_rows, ray_rows)
    assert pre.required_columns() == required and pre.layouts() == layouts
    pa = pytest.importorskip("pyarrow")
    assert (pre.columns(pa.table({"a": [1.0]})) is None) == (kind != "tabular")  # only tabular reads a column batch


def test_read_row_takes_what_each_kind_reads_from_a_batch_row():
    def read(kind: str, row: dict[str, Any]) -> Any:
        return build_pre(kinds.kind(kind).schema.model_validate({"kind": kind}), SPECS[kind], Path(".")).read_row(row)

    assert read("image", {"path": "a.png", "id": 1}) == Path("a.png")
    assert read("audio", {"data": b"RIFF"}) == b"RIFF"
    assert read("text", {"text": "hi"}) == "hi" and read("text", {"prompt": "hello"}) == "hello"
    assert read("tabular", {"a": 1, "b": 2, "id": 7}) == {"a": 1, "b": 2}
    assert read("tensor", {"x": 1}) == {"x": 1}
    assert TABLE.chunk_rows == 65536


def test_tabular_reads_a_column_batch_with_defaults_and_row_errors():
    pa = pytest.importorskip("pyarrow")
    specs = [TensorSpec(name="x", datatype="FP32", shape=[-1, 3], features=["a", {"name": "b", "default": 0.5}, "c"])]
    pre = build_pre(TabularPre(kind="tabular"), specs, Path("."))
    table = pa.table({"a": ["1", "x", "3", None], "b": [1.0, None, 2.0, 4.0], "c": [1.0, 2.0, float("inf"), 4.0]})
    read = pre.columns(table)
    assert sorted(read.errors) == [1, 2, 3]
    assert read.errors[1] == "a: expected a number (got 'x')"
    assert read.errors[2].startswith("c: expected a finite number (got ")  # numpy's repr of inf, as before
    assert read.errors[3] == "a: missing feature (no default declared)"
    assert read.feeds["x"].dtype == np.float32
    np.testing.assert_array_equal(read.feeds["x"][0], [1, 1, 1])
    assert read.feeds["x"][1, 1] == 0.5  # a null takes the default
    # the same rows through the instances path agree on the good row
    np.testing.assert_array_equal(pre([{"a": "1", "b": 1.0, "c": 1.0}])["x"][0], read.feeds["x"][0])
    assert pre.columns(pa.table({"b": [1.0]})).errors == {0: "a: missing feature (no default declared)"}


def test_answers_give_labels_of_class_indices(tmp_path):
    write_model(tmp_path, "iris", iris_like_config(), linear_model(4, 3))
    answers = Repository(tmp_path).load("iris").predict(np.zeros((2, 4), np.float32))
    order = np.argsort(-answers.probabilities, axis=1, kind="stable")[:, :2]  # model.yaml's top_k is 2
    assert answers.labels_of(order).tolist() == [[t["label"] for t in a["top_k"]] for a in answers]


# --- Pillow only for image models --------------------------------------------------------------------


def test_pillow_is_imported_only_when_an_image_kind_is_built(tmp_path):
    write_model(tmp_path, "iris", iris_like_config(), linear_model(4, 3))
    write_model(tmp_path, "digits", {"task": "custom", "pre": {"kind": "image", "color": "L", "layout": "NCHW"}},
                image_model(1, 8, 8))  # fmt: skip
    script = (
        "import sys, forwardpass\n"
        "assert 'PIL' not in sys.modules, 'import forwardpass imported Pillow'\n"
        "iris = forwardpass.load('iris', repository=sys.argv[1])\n"
        "iris.predict({'f0': 1, 'f1': 2, 'f2': 3, 'f3': 4})\n"
        "assert 'PIL' not in sys.modules, 'a tabular model imported Pillow'\n"
        "forwardpass.load('digits', repository=sys.argv[1])\n"
        "assert 'PIL' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
