"""Model: tensors in, answers out; validation of every input before the forward pass."""

import numpy as np
import pytest
from fixtures import iris_like_config, linear_model, weights, write_model

from forwardpass import InvalidInput, Repository
from forwardpass.pipeline import softmax


@pytest.fixture
def model(tmp_path):
    write_model(tmp_path, "clf", iris_like_config(), linear_model(4, 3))
    return Repository(tmp_path).load("clf")


def expected_probs(x):
    W, b = weights(linear_model(4, 3))
    return softmax((x @ W + b).astype(np.float32))


def test_tensor_batch_and_single(model):
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
    batch = model.predict(x)
    probs = expected_probs(x)
    assert [a["label"] for a in batch] == [["a", "b", "c"][i] for i in probs.argmax(1)]
    np.testing.assert_allclose([a["probability"] for a in batch], probs.max(1), rtol=1e-5)
    single = model.predict(x[0])  # no batch axis -> one answer
    assert single == batch[0]
    assert model.predict({"input": x}) == batch


def test_tabular_rows_equal_tensors(model):
    rows = [{"f0": 0.1, "f1": 0.2, "f2": 0.3, "f3": 0.4}, {"f3": 1, "f2": 2, "f1": 3, "f0": 4}]
    x = np.array([[0.1, 0.2, 0.3, 0.4], [4, 3, 2, 1]], np.float32)
    assert model.predict(rows) == model.predict(x)
    assert model.predict(rows[0]) == model.predict(x)[0]
    assert model.predict([0.1, 0.2, 0.3, 0.4]) == model.predict(x)[0]  # a list of numbers is one row


def test_top_k(model):
    answer = model.predict(np.zeros(4, np.float32), top_k=3)
    assert len(answer["top_k"]) == 3
    assert sorted((t["probability"] for t in answer["top_k"]), reverse=True) == [t["probability"] for t in answer["top_k"]]
    assert abs(sum(t["probability"] for t in answer["top_k"]) - 1) < 1e-5
    assert len(model.predict(np.zeros(4, np.float32))["top_k"]) == 2  # model.yaml's top_k


def test_run_raw(model):
    x = np.ones((3, 4), np.float32)
    out = model.run({"input": x})
    W, b = weights(linear_model(4, 3))
    np.testing.assert_allclose(out["logits"], x @ W + b, rtol=1e-5)
    with pytest.raises(InvalidInput, match="unknown output"):
        model.run({"input": x}, ["nope"])


@pytest.mark.parametrize(
    ("data", "loc", "msg"),
    [
        ([], ("instances",), "at least one instance"),
        (np.zeros((2, 5), np.float32), ("inputs", "input"), "expected shape [-1, 4], got [2, 5]"),
        (np.array([["a", "b", "c", "d"]]), ("inputs", "input"), "expected datatype FP32, got BYTES"),
        (np.array([[1, np.nan, 0, 0]], np.float32), ("inputs", "input"), "NaN"),
        ({"input": np.zeros((1, 4)), "extra": np.zeros(1)}, ("inputs", "extra"), "unknown input"),
        ({"f0": 1, "f1": 2, "f2": 3}, ("instances", 0, "f3"), "missing feature"),
        ({"f0": 1, "f1": 2, "f2": 3, "f3": 4, "f4": 5}, ("instances", 0, "f4"), "unknown feature"),
        ({"f0": 1, "f1": 2, "f2": 3, "f3": "x"}, ("instances", 0, "f3"), "expected a number"),
        ({"f0": 1, "f1": 2, "f2": 3, "f3": float("nan")}, ("instances", 0, "f3"), "finite"),
        ({"f0": 1, "f1": 2, "f2": 3, "f3": [1]}, ("instances", 0, "f3"), "expected a number"),
        ([[1, 2, 3]], ("instances", 0), "expected 4 values"),
        ([{"f0": 1, "f1": 2, "f2": 3, "f3": 4}, 5], ("instances", 1), "expected an object of named features"),
    ],
)
def test_bad_input(model, data, loc, msg):
    with pytest.raises(InvalidInput) as info:
        model.predict(data)
    assert info.value.loc == loc
    assert msg in info.value.msg


def test_missing_input_in_mapping(tmp_path):
    from fixtures import token_model

    config = {"task": "classification", "post": {"kind": "classification", "logits": True}}
    write_model(tmp_path, "tok", config, token_model(10))
    model = Repository(tmp_path).load("tok")
    with pytest.raises(InvalidInput, match="inputs.attention_mask: missing input"):
        model.predict({"input_ids": np.zeros((1, 3), np.int64)})
    with pytest.raises(InvalidInput, match="pass a mapping"):
        model.predict(np.zeros((1, 3), np.int64))
    with pytest.raises(InvalidInput, match="rejected the inputs"):  # batch sizes disagree
        model.predict({"input_ids": np.zeros((2, 3), np.int64), "attention_mask": np.zeros((2, 4), np.int64)})
    with pytest.raises(InvalidInput, match="out of data bounds"):  # token id past the vocabulary
        model.predict({"input_ids": np.full((1, 3), 99, np.int64), "attention_mask": np.ones((1, 3), np.int64)})
    with pytest.raises(InvalidInput, match=r"instances\[0\]: the model takes 2 inputs .* send a mapping of input name"):
        model.predict(["some text"])  # no pre-processing: instances are rows of the inputs, here a mapping each
    rows = model.predict([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 0]}])
    direct = model.predict({"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.array([[1, 1, 0]])})
    assert rows[0] == direct[0]


def test_defaults_fill_missing_features(tmp_path):
    features = ["f0", {"name": "f1", "default": 2.0}, "f2", "f3"]
    config = iris_like_config(inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 4], "features": features}])
    write_model(tmp_path, "clf", config, linear_model(4, 3))
    model = Repository(tmp_path).load("clf")
    with_default = model.predict({"f0": 1, "f2": 3, "f3": 4})
    assert with_default == model.predict(np.array([1, 2, 3, 4], np.float32))
    assert model.predict({"f0": "1", "f1": "", "f2": " 3 ", "f3": "4"}) == with_default  # CSV strings


def test_a_number_past_float32_is_refused_by_name_without_a_warning(demo_repo):
    import warnings

    import forwardpass
    from forwardpass.errors import InvalidInput

    iris = forwardpass.load("iris", repository=demo_repo)
    row = {"sepal length (cm)": 1e308, "sepal width (cm)": 3.5, "petal length (cm)": 1.4, "petal width (cm)": 0.2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the overflow to inf was a RuntimeWarning: a 500 under -W error
        with pytest.raises(InvalidInput, match="finite"):
            iris.predict(row)
