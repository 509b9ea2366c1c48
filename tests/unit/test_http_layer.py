"""forwardpass.server.http: an error reply's body always encodes (issue 13: an error reply must never fail)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forwardpass.server.http import Response


@pytest.mark.parametrize("value", [10**30, -(10**30), object(), {1, 2}, np.array([1, 2], dtype=object)])
def test_error_body_encodes_what_orjson_cannot(value):
    r = Response.json({"error": "bad", "detail": [{"input": value}]}, 400)
    doc = json.loads(r.body)
    assert r.status == 400 and doc["error"] == "bad" and "input" in doc["detail"][0]
    if isinstance(value, int):
        assert doc["detail"][0]["input"] == value


def test_error_body_that_nothing_can_encode_still_answers_with_its_status():
    cycle: list[object] = []
    cycle.append(cycle)
    r = Response.json({"error": cycle}, 413)
    assert r.status == 413 and json.loads(r.body) == {"error": "413 Request Entity Too Large"}


def test_success_body_that_orjson_cannot_encode_still_raises():
    with pytest.raises(TypeError):  # a 200 with an unencodable value is a bug to see, not to paper over
        Response.json({"value": 10**30})
