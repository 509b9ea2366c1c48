"""V2 request parsing and response encoding, JSON and binary, with errors that name the field."""

import struct

import numpy as np
import orjson
import pytest

from forwardpass.errors import InvalidInput
from forwardpass.inference import OutputTensor
from forwardpass.server.v2 import encode_response, parse_infer


def test_json_request():
    body = orjson.dumps({
        "id": 42, "parameters": {"binary_data_output": True},
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]},
                   {"name": "s", "shape": [2], "datatype": "BYTES", "data": ["héllo", "b"]}],
        "outputs": [{"name": "y", "parameters": {"classification": 2}}, {"name": "z", "parameters": {"binary_data": False}}],
    })  # fmt: skip
    req = parse_infer(body, None, 100)
    assert req.id == "42" and req.binary_output
    np.testing.assert_array_equal(req.inputs[0].array, [[1, 2], [3, 4]])
    assert req.inputs[0].array.dtype == np.int64
    assert req.inputs[1].array.tolist() == ["héllo".encode(), b"b"]
    assert [(o.name, o.binary, o.classification) for o in req.outputs] == [("y", True, 2), ("z", False, 0)]


def test_binary_request_with_bytes_and_fp16():
    x = np.arange(6, dtype=np.float16).reshape(2, 3)
    strings = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"xyz"))
    head = orjson.dumps({"inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP16", "parameters": {"binary_data_size": x.nbytes}},
        {"name": "s", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(strings)}},
    ]})  # fmt: skip
    req = parse_infer(head + x.tobytes() + strings, len(head), 100)
    np.testing.assert_array_equal(req.inputs[0].array, x)
    assert req.inputs[1].array.tolist() == [b"ab", b"", b"xyz"]
    assert bytes(req.inputs[0].raw) == x.tobytes()


@pytest.mark.parametrize(
    ("doc", "tail", "loc", "msg"),
    [
        ({"inputs": []}, b"", ("inputs",), "non-empty list"),
        ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, b"", ("inputs", 0, "name"), "string"),
        ({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}, b"", ("inputs", "x", "shape"), "non-negative"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP8", "data": [1]}]}, b"", ("inputs", "x", "datatype"), "one of"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}, b"", ("inputs", "x", "data"), "needs 2 elements"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": ["a"]}]}, b"", ("inputs", "x", "data"), "expected integers"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, b"", ("inputs", "x", "data"), "missing"),
        ({"inputs": [{"name": "x", "shape": [1000], "datatype": "FP32", "data": [0] * 1000}]}, b"", ("inputs", "x", "shape"), "more than"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}, b"\0" * 4,
         ("inputs", "x", "parameters", "binary_data_size"), "must fit"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}, b"\0" * 4,
         ("inputs", "x", "parameters", "binary_data_size"), "needs 8 bytes"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}, b"\0" * 6,
         ("body",), "left over"),
        ({"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]},
         struct.pack("<I", 9) + b"ab", ("inputs", "s", "data"), "runs past"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": True}}]}, b"\0" * 4,
         ("inputs", "x", "parameters", "binary_data_size"), "must fit"),
        ({"inputs": [{"name": "x", "shape": [0, 2**63], "datatype": "FP32", "data": []}]}, b"", ("inputs", "x", "shape"),
         "a dimension of"),
        ({"inputs": [{"name": "x", "shape": [1] * 33, "datatype": "FP32", "data": [1]}]}, b"", ("inputs", "x", "shape"),
         "up to 32"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": ["FP32"], "data": [1]}]}, b"", ("inputs", "x", "datatype"),
         "one of"),
        ({"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "data": ["a", 5]}]}, b"", ("inputs", "s", "data"),
         "expected strings"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}]}, b"", ("inputs", "x", "data"),
         "do not fit UINT8"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}]}, b"", ("inputs", "x", "data"),
         "expected true/false"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "id": {"a": 1}}, b"", ("id",), "string"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "parameters": {"timeout": True}}, b"",
         ("parameters", "timeout"), "microseconds"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "parameters": {"binary_data_output": 1}},
         b"", ("parameters", "binary_data_output"), "true or false"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{"name": "y"}, {"name": "y"}]},
         b"", ("outputs", "y"), "listed twice"),
    ],
)  # fmt: skip
def test_bad_requests(doc, tail, loc, msg):
    head = orjson.dumps(doc)
    with pytest.raises(InvalidInput) as info:
        parse_infer(head + tail, len(head) if tail else None, 100)
    assert info.value.loc == loc and msg in info.value.msg


def test_malformed_json_and_header_length():
    with pytest.raises(InvalidInput, match="malformed JSON"):
        parse_infer(b"{oops", None, 10)
    with pytest.raises(InvalidInput, match="body size"):
        parse_infer(b"{}", 99, 10)
    with pytest.raises(InvalidInput, match="JSON object"):
        parse_infer(b"[1]", None, 10)


def test_encode_json_and_binary():
    probs = np.array([[0.25, 0.75]], np.float32)
    labels = np.array([b"yes"], dtype=object)
    body, n = encode_response("m", 3, "r1", [OutputTensor("p", "FP32", probs, False), OutputTensor("l", "BYTES", labels, False)])
    assert n is None
    doc = orjson.loads(body)
    assert doc == {"model_name": "m", "model_version": "3", "id": "r1", "outputs": [
        {"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]},
        {"name": "l", "datatype": "BYTES", "shape": [1], "data": ["yes"]}]}  # fmt: skip
    body, n = encode_response("m", 3, None, [OutputTensor("p", "FP32", probs, True), OutputTensor("l", "BYTES", labels, True)])
    head = orjson.loads(body[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [8, 7] and "id" not in head
    assert np.frombuffer(body[n : n + 8], np.float32).tolist() == [0.25, 0.75]
    assert body[n + 8 :] == struct.pack("<I", 3) + b"yes"


def test_a_large_body_is_parsed_on_a_worker_thread_and_a_small_one_on_the_loop(monkeypatch):
    """One long JSON tensor (about 7 ms a MB) must not hold up every other connection on the event loop."""
    import asyncio
    import threading

    from forwardpass.server import v2

    threads: list[int] = []
    parse = v2.parse_infer

    def recording(*args):
        threads.append(threading.get_ident())
        return parse(*args)

    monkeypatch.setattr(v2, "parse_infer", recording)

    def body(n: int) -> bytes:
        return orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [n], "data": [0.5] * n}]})

    async def both() -> tuple[int, list]:
        small = await v2.parse_infer_off_loop(body(4), None, 10**7)
        large = await v2.parse_infer_off_loop(body(100_000), None, 10**7)
        assert large.inputs[0].array.shape == (100_000,) and small.inputs[0].array.shape == (4,)
        return threading.get_ident(), threads

    loop_thread, seen = asyncio.run(both())
    assert len(body(100_000)) > v2.OFF_LOOP_BYTES >= len(body(4))
    assert seen[0] == loop_thread and seen[1] != loop_thread
