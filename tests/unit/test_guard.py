"""NaN/infinity checks: inside the graph when it can be edited, in numpy otherwise; same errors."""

import numpy as np
import onnx
import pytest
from fixtures import iris_like_config, linear_model, write_model

from forwardpass import InvalidInput, Repository
from forwardpass.runtime.guard import GUARD_PREFIX, add_finite_guards


def test_guard_outputs_are_added_and_hidden(tmp_path):
    write_model(tmp_path, "m", iris_like_config(), linear_model(4, 3))
    model = Repository(tmp_path).load("m")
    assert model.runtime.guarded == {"input"}
    assert [o.name for o in model.runtime.outputs] == ["logits"]
    assert list(model.run({"input": np.ones((2, 4), np.float32)})) == ["logits"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("rows", [1, 500])  # small and large tensors take different paths in numpy
def test_non_finite_rejected_with_or_without_graph_guard(tmp_path, bad, rows):
    write_model(tmp_path, "guarded", iris_like_config(), linear_model(4, 3))
    folder = write_model(tmp_path, "external", iris_like_config(), linear_model(4, 3))
    m = onnx.load(str(folder / "1" / "model.onnx"))
    onnx.save(m, str(folder / "1" / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert add_finite_guards(folder / "1" / "model.onnx") is None  # external data: numpy checks instead
    repo = Repository(tmp_path)
    x = np.ones((rows, 4), np.float32)
    x[-1, 2] = bad
    for name in ("guarded", "external"):
        model = repo.load(name)
        with pytest.raises(InvalidInput, match="finite") as info:
            model.predict(x)
        assert info.value.loc == ("inputs", "input")
        with pytest.raises(InvalidInput, match="finite"):
            model.run({"input": x})
    assert repo.get("external").runtime.guarded == frozenset()


def test_allow_nan_inputs_are_not_guarded(tmp_path):
    spec = {"name": "input", "datatype": "FP32", "shape": [-1, 4], "allow_nan": True}
    write_model(tmp_path, "m", iris_like_config(inputs=[spec], pre={"kind": "tensor"}), linear_model(4, 3))
    model = Repository(tmp_path).load("m")
    assert model.runtime.guarded == frozenset()
    answer = model.predict(np.array([1, np.nan, 0, 0], np.float32))
    assert answer["label"] in "abc"  # NaN flows through, as declared
    assert not any(GUARD_PREFIX in o.name for o in model.runtime.outputs)
