"""Open Inference Protocol V2 over REST: request parsing and response encoding, JSON and binary.

The binary tensor data extension: the body is a JSON header of ``Inference-Header-Content-Length``
bytes followed by raw tensors, each input whose ``parameters.binary_data_size`` says how many
bytes it takes, in input order. BYTES elements are a 4-byte little-endian length plus the bytes.
Outputs go binary when asked (``binary_data_output`` on the request, or ``binary_data`` per output).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import numpy as np
import orjson

from forwardpass.errors import InvalidInput
from forwardpass.inference import InferRequest, InputTensor, OutputTensor, RequestedOutput
from forwardpass.server.errors import shown
from forwardpass.tensors import to_numpy

_DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
              "FP16", "FP32", "FP64", "BYTES"}  # fmt: skip
_MAX_RANK = 32  # numpy's limit was 32 dimensions; no model input comes near it
# JSON numbers numpy may read as each datatype (numpy's kind letters): no strings, no floats into ints
_KINDS = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf"}
_KIND_WORDS = {"b": "true/false", "iu": "integers", "iuf": "numbers"}
_GOT = {"U": "strings", "S": "strings", "O": "null, objects or integers out of range", "b": "true/false",
        "f": "floating-point numbers", "i": "integers", "u": "integers"}  # fmt: skip
_SCALARS = (str, int, float, bool)


OFF_LOOP_BYTES = 64 * 1024  # larger bodies are parsed on a worker thread (JSON: about 7 ms per MB here)


async def parse_infer_off_loop(body: bytes, header_length: int | None, max_elements: int) -> InferRequest:
    """``parse_infer``, on a worker thread when the body is large, so that one big request (a long JSON
    tensor) never holds up the event loop and every other connection on it."""
    if len(body) <= OFF_LOOP_BYTES:
        return parse_infer(body, header_length, max_elements)
    return await asyncio.to_thread(parse_infer, body, header_length, max_elements)


def parse_infer(body: bytes, header_length: int | None, max_elements: int) -> InferRequest:
    """Decode a V2 infer body; every problem is an InvalidInput naming the field."""
    if header_length is not None and not 0 <= header_length <= len(body):
        raise InvalidInput(("Inference-Header-Content-Length",), f"must be between 0 and the body size {len(body)}",
                           header_length)  # fmt: skip
    head = body if header_length is None else body[:header_length]
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(("body",), f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(("body",), "expected a JSON object", type(doc).__name__)
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput(("inputs",), "expected a non-empty list of input tensors", shown(raw_inputs))
    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    offset = 0
    inputs = []
    names: set[str] = set()
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise InvalidInput(("inputs", i), "expected an object with name, shape, datatype and data", shown(item))
        name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
        if not isinstance(name, str) or not name:
            raise InvalidInput(("inputs", i, "name"), "expected a string", shown(name))
        if name in names:
            raise InvalidInput(("inputs", i, "name"), f"input '{name}' is given twice; send each input once", name)
        names.add(name)
        loc = ("inputs", name)
        count = _check_shape(loc, shape, max_elements)
        assert isinstance(shape, list)  # _check_shape refused everything else
        if not isinstance(datatype, str) or datatype not in _DATATYPES:
            raise InvalidInput((*loc, "datatype"), f"expected one of {sorted(_DATATYPES)}", shown(datatype))
        params = _parameters((*loc, "parameters"), item.get("parameters"))
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput((*loc, "parameters", "binary_data_size"),
                                   f"must fit in the {len(binary) - offset} binary bytes left", shown(size))  # fmt: skip
            raw = binary[offset : offset + size]
            offset += size
            array = _from_binary(loc, raw, datatype, shape, count)
        else:
            if "data" not in item:
                raise InvalidInput((*loc, "data"), "missing: give data, or parameters.binary_data_size with a binary body")
            raw = None
            array = _from_json(loc, item["data"], datatype, shape, count)
        inputs.append(InputTensor(name, datatype, shape, array, raw))
    if offset != len(binary):
        raise InvalidInput(("body",), f"{len(binary) - offset} binary bytes left over after the inputs")
    params = _parameters(("parameters",), doc.get("parameters"))
    binary_output = _flag(("parameters", "binary_data_output"), params.get("binary_data_output"), False)
    timeout = params.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InvalidInput(("parameters", "timeout"), "expected microseconds > 0", shown(timeout))
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise InvalidInput(("outputs",), "expected a list", shown(doc["outputs"]))
        outputs = [_requested(i, o, binary_output) for i, o in enumerate(doc["outputs"])]
        listed: set[str] = set()
        for o in outputs:
            if o.name in listed:
                raise InvalidInput(("outputs", o.name), "is listed twice; ask for each output once", o.name)
            listed.add(o.name)
    request_id = doc.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (str, int))):
        raise InvalidInput(("id",), "expected a string", shown(request_id))
    return InferRequest(None if request_id is None else str(request_id), inputs, outputs, params, binary_output)


def _check_shape(loc: tuple[str, ...], shape: Any, max_elements: int) -> int:
    """The element count of a valid shape: a list of at most 32 non-negative integers, within max_elements."""
    if not isinstance(shape, list) or len(shape) > _MAX_RANK:
        raise InvalidInput((*loc, "shape"), f"expected a list of up to {_MAX_RANK} non-negative integers", shown(shape))
    count = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise InvalidInput((*loc, "shape"), f"expected a list of up to {_MAX_RANK} non-negative integers",
                               shown(shape))  # fmt: skip
        count *= d
    if count > max_elements:
        raise InvalidInput((*loc, "shape"), f"{count} elements is more than this server accepts ({max_elements})",
                           shown(shape))  # fmt: skip
    if count == 0 and any(d > max_elements for d in shape):  # [0, 10**30]: no elements, and no array either
        raise InvalidInput((*loc, "shape"), f"a dimension of {max(shape)} is more than this server accepts "
                           f"({max_elements})", shown(shape))  # fmt: skip
    return count


def _parameters(loc: tuple[str | int, ...], params: Any) -> dict[str, Any]:
    """A V2 parameters object: string keys to strings, numbers or booleans (null means absent)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(loc, "expected an object of parameters", shown(params))
    for key, value in params.items():
        if value is not None and not isinstance(value, _SCALARS):
            raise InvalidInput((*loc, key), "expected a string, a number or a boolean (a V2 parameter value)",
                               shown(value))  # fmt: skip
    return params


def _flag(loc: tuple[str | int, ...], value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(loc, "expected true or false", shown(value))
    return value


def _requested(i: int, item: Any, default_binary: bool) -> RequestedOutput:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        raise InvalidInput(("outputs", i), "expected an object with a name", shown(item))
    name = item["name"]
    params = _parameters(("outputs", name, "parameters"), item.get("parameters"))
    k = params.get("classification")
    if k is None:
        k = 0
    elif isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InvalidInput(("outputs", name, "parameters", "classification"), "expected an integer count >= 0", shown(k))
    binary = _flag(("outputs", name, "parameters", "binary_data"), params.get("binary_data"), default_binary)
    return RequestedOutput(name, binary, k)


def _from_json(loc: tuple[str, ...], data: Any, datatype: str, shape: list[int], count: int) -> np.ndarray:
    if datatype == "BYTES":
        values = _flatten(loc, data, len(shape))
        if len(values) != count:
            raise InvalidInput((*loc, "data"), f"shape {shape} needs {count} elements, data has {len(values)}")
        flat = np.empty(count, dtype=object)
        flat[:] = [v.encode() for v in values]
        return flat.reshape(shape)
    try:  # numpy reads the JSON values first, so that their kind can be checked before any cast
        read = np.asarray(data)
    except (TypeError, ValueError) as exc:
        raise InvalidInput((*loc, "data"), f"does not fit datatype {datatype} and shape {shape}: {exc}") from None
    if read.size != count:
        raise InvalidInput((*loc, "data"), f"shape {shape} needs {count} elements, data has {read.size}")
    if count:
        kinds = _KINDS.get(datatype, "iu")
        if read.dtype.kind not in kinds:
            fix = "send JSON numbers, not strings" if read.dtype.kind in "US" else f"send {_KIND_WORDS[kinds]}"
            raise InvalidInput((*loc, "data"), f"expected {_KIND_WORDS[kinds]} for datatype {datatype}, got "
                               f"{_GOT.get(read.dtype.kind, str(read.dtype))}: {fix}",
                               shown(data if read.size <= 8 else read.reshape(-1)[:8].tolist()))  # fmt: skip
        if kinds == "iu" and read.dtype != to_numpy(datatype):
            info = np.iinfo(to_numpy(datatype))
            low, high = read.min(), read.max()
            if low < info.min or high > info.max:
                raise InvalidInput((*loc, "data"), f"values from {low} to {high} do not fit {datatype} "
                                   f"({info.min} to {info.max})")  # fmt: skip
    dtype = to_numpy(datatype)
    if datatype in ("FP16", "FP32"):
        with np.errstate(over="ignore"):  # a float64 too big for FP32 becomes inf, which the input check refuses
            return read.astype(dtype, copy=False).reshape(shape)
    return read.astype(dtype, copy=False).reshape(shape)


def _flatten(loc: tuple[str, ...], data: Any, rank: int) -> list[str]:
    """BYTES data, nested at most ``rank`` levels (or flat), as one list of strings; no recursion."""
    out: list[str] = []
    stack = [(iter([data]), 0)]
    while stack:
        items, depth = stack[-1]
        item = next(items, _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if depth >= max(rank, 1):
                raise InvalidInput((*loc, "data"), f"nested deeper than the shape's {rank} dimensions")
            stack.append((iter(item), depth + 1))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise InvalidInput((*loc, "data"), "expected strings for datatype BYTES", shown(item))
    return out


_END = object()


def _from_binary(loc: tuple[str, ...], raw: memoryview, datatype: str, shape: list[int], count: int) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise InvalidInput((*loc, "data"), "BYTES element length prefix is cut off")
            (n,) = struct.unpack_from("<I", raw, pos)
            if pos + 4 + n > len(raw):
                raise InvalidInput((*loc, "data"), f"BYTES element of {n} bytes runs past the tensor's binary data")
            items.append(bytes(raw[pos + 4 : pos + 4 + n]))
            pos += 4 + n
            if len(items) > count:  # do not walk millions of empty elements past the shape
                break
        if len(items) != count:
            got = f"more than {count}" if len(items) > count else str(len(items))
            raise InvalidInput((*loc, "data"), f"shape {shape} needs {count} elements, binary data has {got}")
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = to_numpy(datatype)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput((*loc, "parameters", "binary_data_size"),
                           f"shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, got {len(raw)}")  # fmt: skip
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)


def encode_response(
    model: str, version: int, request_id: str | None, outputs: list[OutputTensor], parameters: dict | None = None
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    entries = []
    chunks = []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.array.shape)}
        if out.binary:
            data = _to_binary(out.array, out.datatype)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        elif out.datatype == "BYTES":
            entry["data"] = [_text(v) for v in out.array.reshape(-1).tolist()]
        elif out.datatype == "FP16":
            entry["data"] = out.array.astype(np.float32).reshape(-1)
        else:
            entry["data"] = np.ascontiguousarray(out.array).reshape(-1)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def _to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for value in array.reshape(-1).tolist():
            data = value if isinstance(value, bytes) else str(value).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
