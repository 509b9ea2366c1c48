"""Tensor datatypes (Open Inference Protocol V2 names <-> numpy <-> ONNX Runtime) and shape checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from forwardpass.errors import InvalidInput

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip

_NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_FROM_ORT = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def to_numpy(datatype: str) -> np.dtype:
    """V2 datatype name -> numpy dtype (BYTES -> object)."""
    return _NUMPY[datatype]


def from_ort(ort_type: str) -> str:
    """ONNX Runtime type string ('tensor(float)') -> V2 datatype name ('FP32')."""
    try:
        return _FROM_ORT[ort_type]
    except KeyError:
        raise ValueError(f"unsupported ONNX tensor type {ort_type}") from None


def from_numpy(dtype: np.dtype) -> str:
    """numpy dtype -> V2 datatype name; strings and objects are BYTES."""
    if dtype.kind in "OSU":
        return "BYTES"
    for name, candidate in _NUMPY.items():
        if candidate == dtype:
            return name
    raise ValueError(f"no V2 datatype for numpy dtype {dtype}")


def shape_matches(expected: Sequence[int], actual: Sequence[int]) -> bool:
    """True when ``actual`` fits ``expected`` (-1 in expected matches any size)."""
    if len(expected) != len(actual):
        return False
    return all(e == -1 or e == a for e, a in zip(expected, actual))


def check_tensor(
    name: str, array: np.ndarray, datatype: str, shape: Sequence[int], *, allow_nan: bool = False
) -> np.ndarray:
    """Validate (and losslessly cast) one input tensor; raise InvalidInput naming the input.

    Casting is allowed within a kind (float64 -> float32, int32 -> int64) and from
    ints to floats; anything else (strings to numbers, floats to ints) is an error.
    """
    want = _NUMPY[datatype]
    if array.dtype != want:
        if datatype == "BYTES":
            if array.dtype.kind not in "OSU":
                raise InvalidInput(("inputs", name), f"expected BYTES (strings), got {from_numpy_name(array.dtype)}")
            array = array.astype(object)
        elif array.dtype.kind in "biuf" and np.can_cast(array.dtype, want, "same_kind"):
            array = array.astype(want)
        else:
            raise InvalidInput(("inputs", name), f"expected datatype {datatype}, got {from_numpy_name(array.dtype)}")
    if not shape_matches(shape, array.shape):
        raise InvalidInput(("inputs", name), f"expected shape {list(shape)}, got {list(array.shape)}")
    if array.size == 0:
        raise InvalidInput(("inputs", name), "expected a non-empty tensor, got one with 0 elements")
    if not allow_nan and want.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(("inputs", name), "expected finite numbers, got NaN or infinity")
    return array


def from_numpy_name(dtype: np.dtype) -> str:
    """Best-effort V2 name for messages (falls back to numpy's name)."""
    try:
        return from_numpy(dtype)
    except ValueError:
        return str(dtype)
