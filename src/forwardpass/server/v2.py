"""Open Inference Protocol V2 over REST: request parsing and response encoding, JSON and binary.

The binary tensor data extension: the body is a JSON header of ``Inference-Header-Content-Length``
bytes followed by raw tensors, each input whose ``parameters.binary_data_size`` says how many
bytes it takes, in input order. BYTES elements are a 4-byte little-endian length plus the bytes.
Outputs go binary when asked (``binary_data_output`` on the request, or ``binary_data`` per output).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson

from forwardpass.errors import InvalidInput
from forwardpass.inference import InferRequest, InputTensor, OutputTensor, RequestedOutput
from forwardpass.tensors import to_numpy

_DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
              "FP16", "FP32", "FP64", "BYTES"}  # fmt: skip


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
        raise InvalidInput(("inputs",), "expected a non-empty list of input tensors", raw_inputs)
    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    offset = 0
    inputs = []
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise InvalidInput(("inputs", i), "expected an object with name, shape, datatype and data", item)
        name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
        if not isinstance(name, str) or not name:
            raise InvalidInput(("inputs", i, "name"), "expected a string", name)
        loc = ("inputs", name)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InvalidInput((*loc, "shape"), "expected a list of non-negative integers", shape)
        if datatype not in _DATATYPES:
            raise InvalidInput((*loc, "datatype"), f"expected one of {sorted(_DATATYPES)}", datatype)
        count = 1
        for d in shape:
            count *= d
        if count > max_elements:
            raise InvalidInput((*loc, "shape"), f"{count} elements is more than this server accepts ({max_elements})",
                               shape)  # fmt: skip
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput((*loc, "parameters", "binary_data_size"),
                                   f"must fit in the {len(binary) - offset} binary bytes left", size)  # fmt: skip
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
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput(("parameters",), "expected an object", params)
    binary_output = bool(params.get("binary_data_output", False))
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise InvalidInput(("outputs",), "expected a list", doc["outputs"])
        outputs = [_requested(i, o, binary_output) for i, o in enumerate(doc["outputs"])]
    request_id = doc.get("id")
    return InferRequest(None if request_id is None else str(request_id), inputs, outputs, params, binary_output)


def _requested(i: int, item: Any, default_binary: bool) -> RequestedOutput:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidInput(("outputs", i), "expected an object with a name", item)
    params = item.get("parameters") or {}
    k = params.get("classification", 0)
    if not isinstance(k, int) or k < 0:
        raise InvalidInput(("outputs", item["name"], "parameters", "classification"), "expected a count >= 0", k)
    return RequestedOutput(item["name"], bool(params.get("binary_data", default_binary)), k)


def _from_json(loc: tuple[str, ...], data: Any, datatype: str, shape: list[int], count: int) -> np.ndarray:
    try:
        if datatype == "BYTES":
            flat = np.empty(count, dtype=object)
            values = _flatten(data)
            if len(values) != count:
                raise ValueError(f"shape {shape} needs {count} elements, data has {len(values)}")
            flat[:] = [v.encode() if isinstance(v, str) else v for v in values]
            return flat.reshape(shape)
        array = np.asarray(data, dtype=to_numpy(datatype))
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput((*loc, "data"), f"does not fit datatype {datatype} and shape {shape}: {exc}") from None
    if array.size != count:
        raise InvalidInput((*loc, "data"), f"shape {shape} needs {count} elements, data has {array.size}")
    return array.reshape(shape)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


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
        if len(items) != count:
            raise InvalidInput((*loc, "data"), f"shape {shape} needs {count} elements, binary data has {len(items)}")
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
