"""Tensor datatypes (Open Inference Protocol V2 names <-> numpy <-> ONNX Runtime) and shape checks."""

from __future__ import annotations

from collections.abc import Sequence
from math import isfinite as _isfinite
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


_FROM_NUMPY = {dtype: name for name, dtype in _NUMPY.items()}


def from_numpy(dtype: np.dtype) -> str:
    """numpy dtype -> V2 datatype name; strings and objects are BYTES."""
    name = _FROM_NUMPY.get(dtype)
    if name is not None:
        return name
    if dtype.kind in "OSU":
        return "BYTES"
    raise ValueError(f"no V2 datatype for numpy dtype {dtype}")


def zeros(datatype: str, shape: Sequence[int]) -> np.ndarray:
    """A tensor of zeros (empty strings for BYTES), dynamic dims (-1) as 1: for warm-up and probes."""
    concrete = [1 if d == -1 else d for d in shape]
    if datatype == "BYTES":
        return np.full(concrete, "", dtype=object)
    return np.zeros(concrete, _NUMPY[datatype])


def shape_matches(expected: Sequence[int], actual: Sequence[int]) -> bool:
    """True when ``actual`` fits ``expected`` (-1 in expected matches any size)."""
    if len(expected) != len(actual):
        return False
    return all(e == -1 or e == a for e, a in zip(expected, actual))


# Below this many elements, checking for NaN in Python beats np.isfinite: beside an ONNX Runtime
# call, every numpy ufunc call costs 5-15 us in cache misses (bench/engine.py measured the
# digits/breast-cancer rows at 16 us for isfinite(x).all() against 1-2 us for this loop).
_PYTHON_FINITE_MAX = 256


def _all_finite(array: np.ndarray, size: int) -> bool:
    if size <= _PYTHON_FINITE_MAX:
        return all(map(_isfinite, array.reshape(-1).tolist()))
    return bool(np.isfinite(array).all())


class TensorCheck:
    """Validates (and losslessly casts) one input tensor; built once per input, called per request.

    Casting is allowed within a kind (float64 -> float32, int32 -> int64) and from ints to
    floats; anything else (strings to numbers, floats to ints) raises InvalidInput naming the input.
    """

    __slots__ = ("name", "datatype", "dtype", "shape", "rank", "_fixed", "_check_finite")

    def __init__(self, name: str, datatype: str, shape: Sequence[int], *, allow_nan: bool = False):
        self.name, self.datatype, self.shape = name, datatype, list(shape)
        self.dtype = _NUMPY[datatype]
        self.rank = len(shape)
        self._fixed = [(i, d) for i, d in enumerate(shape) if d != -1]
        self._check_finite = not allow_nan and self.dtype.kind == "f"

    def __call__(self, array: np.ndarray) -> np.ndarray:
        if array.dtype is not self.dtype and array.dtype != self.dtype:  # builtin dtypes are singletons
            array = self._cast(array)
        shape = array.shape
        if len(shape) != self.rank or any(shape[i] != d for i, d in self._fixed):
            raise InvalidInput(("inputs", self.name), f"expected shape {self.shape}, got {list(shape)}")
        size = array.size
        if size == 0:
            raise InvalidInput(("inputs", self.name), "expected a non-empty tensor, got one with 0 elements")
        if self._check_finite and not _all_finite(array, size):
            raise InvalidInput(("inputs", self.name), "expected finite numbers, got NaN or infinity")
        return array

    def _cast(self, array: np.ndarray) -> np.ndarray:
        got = from_numpy_name(array.dtype)
        if self.datatype == "BYTES":
            if array.dtype.kind not in "OSU":
                raise InvalidInput(("inputs", self.name), f"expected BYTES (strings), got {got}")
            return array.astype(object)
        if array.dtype.kind in "biuf" and np.can_cast(array.dtype, self.dtype, "same_kind"):
            return array.astype(self.dtype)
        raise InvalidInput(("inputs", self.name), f"expected datatype {self.datatype}, got {got}")


def check_tensor(
    name: str, array: np.ndarray, datatype: str, shape: Sequence[int], *, allow_nan: bool = False
) -> np.ndarray:
    """One-off form of TensorCheck: validate ``array`` as input ``name``."""
    return TensorCheck(name, datatype, shape, allow_nan=allow_nan)(array)


def from_numpy_name(dtype: np.dtype) -> str:
    """Best-effort V2 name for messages (falls back to numpy's name)."""
    try:
        return from_numpy(dtype)
    except ValueError:
        return str(dtype)
