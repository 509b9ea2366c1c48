"""The error tree: statuses as data, pydantic-shaped dicts."""

import forwardpass
from forwardpass.errors import InvalidInput, format_loc


def test_statuses():
    assert forwardpass.InvalidInput.status == 400
    assert forwardpass.ModelNotFound.status == 404
    assert forwardpass.ModelNotReady.status == 503
    assert forwardpass.InvalidModelName.status == 400
    assert issubclass(forwardpass.ModelConfigError, forwardpass.ForwardpassError)


def test_invalid_input_shape_and_message():
    err = InvalidInput(("instances", 0, "mean radius"), "expected a number", "abc")
    assert err.to_dict() == {"type": "invalid_input", "loc": ["instances", 0, "mean radius"],
                             "msg": "expected a number", "input": "abc"}  # fmt: skip
    assert str(err) == "instances[0].mean radius: expected a number (got 'abc')"
    assert "input" not in InvalidInput(("x",), "missing").to_dict()
    assert InvalidInput(("x",), "bad", b"\x89PNG").to_dict()["input"] == "<4 bytes>"


def test_format_loc():
    assert format_loc(("inputs", "x")) == "inputs.x"
    assert format_loc(("instances", 3)) == "instances[3]"
    assert format_loc(()) == ""
