"""Tensor checks: lossless casts allowed, everything else an InvalidInput naming the input."""

import numpy as np
import pytest

from forwardpass.errors import InvalidInput
from forwardpass.tensors import check_tensor, from_numpy, from_ort, shape_matches, to_numpy


def test_datatype_maps():
    assert to_numpy("FP32") == np.float32 and to_numpy("BYTES") == np.dtype(object)
    assert from_ort("tensor(float)") == "FP32" and from_ort("tensor(string)") == "BYTES"
    assert from_numpy(np.dtype(np.int64)) == "INT64" and from_numpy(np.dtype("<U3")) == "BYTES"
    with pytest.raises(ValueError):
        from_ort("tensor(complex64)")


def test_shape_matches():
    assert shape_matches([-1, 4], (7, 4))
    assert not shape_matches([-1, 4], (7, 5))
    assert not shape_matches([-1, 4], (4,))


def test_casts_within_kind_and_int_to_float():
    assert check_tensor("x", np.zeros((2, 3)), "FP32", [-1, 3]).dtype == np.float32
    assert check_tensor("x", np.zeros((2, 3), np.int32), "FP32", [-1, 3]).dtype == np.float32
    assert check_tensor("x", np.zeros((2,), np.int32), "INT64", [-1]).dtype == np.int64
    assert check_tensor("x", np.array(["a"]), "BYTES", [-1]).dtype == object


@pytest.mark.parametrize(
    ("array", "datatype", "shape", "msg"),
    [
        (np.zeros((2, 3), np.float32), "INT64", [-1, 3], "expected datatype INT64, got FP32"),
        (np.array(["a", "b"]), "FP32", [-1], "expected datatype FP32, got BYTES"),
        (np.zeros((2,), np.float32), "BYTES", [-1], "expected BYTES"),
        (np.zeros((2, 4), np.float32), "FP32", [-1, 3], "expected shape [-1, 3], got [2, 4]"),
        (np.zeros((2, 3, 1), np.float32), "FP32", [-1, 3], "expected shape"),
        (np.zeros((0, 3), np.float32), "FP32", [-1, 3], "0 elements"),
        (np.array([[1.0, np.nan, 2.0]]), "FP32", [-1, 3], "NaN"),
        (np.array([[1.0, np.inf, 2.0]]), "FP64", [-1, 3], "NaN or infinity"),
    ],
)
def test_bad_tensors(array, datatype, shape, msg):
    with pytest.raises(InvalidInput) as info:
        check_tensor("x", array, datatype, shape)
    assert info.value.loc == ("inputs", "x")
    assert msg in info.value.msg


def test_nan_allowed_when_declared():
    out = check_tensor("x", np.array([[np.nan]]), "FP32", [-1, 1], allow_nan=True)
    assert np.isnan(out).all()
