"""Unexpected errors (bugs): a 500 without internals, one traceback per cause in the log, every one counted."""

from __future__ import annotations

import logging

import orjson

from forwardpass.errors import InvalidInput
from forwardpass.server import metrics
from forwardpass.server.errors import error_response, shown
from forwardpass.stats import Stats


def _raise_key_error() -> None:
    {}["missing"]  # noqa: B018 - the same line raises every time: one cause


def test_an_unexpected_error_is_logged_once_per_cause_and_counted_every_time(caplog):
    stats = Stats()
    caplog.set_level(logging.INFO, logger="forwardpass.server")  # the repeats go to debug level
    for _ in range(500):
        try:
            _raise_key_error()
        except KeyError as exc:
            response = error_response(exc, stats)
    assert response.status == 500 and orjson.loads(response.body) == {"error": "internal error: KeyError",
                                                                      "type": "internal_error"}  # fmt: skip
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "logged once" in tracebacks[0].getMessage()
    assert sum(len(r.getMessage()) for r in caplog.records) < 20_000  # 500 tracebacks were ~600 kB
    try:
        int("not a number")
    except ValueError as exc:  # another cause: its own traceback
        error_response(exc, stats)
    assert len([r for r in caplog.records if r.exc_info]) == 2
    stats.unexpected("smollm2", "1")  # what the OpenAI routes count, under the language model's name
    text = metrics.render(stats).decode()
    assert 'forwardpass_requests_total{model="",status="500",version=""} 501.0' in text
    assert 'forwardpass_requests_total{model="smollm2",status="500",version="1"} 1.0' in text


def test_500s_of_a_model_and_of_the_server_add_up_in_one_series():
    stats = Stats()
    stats.stats("digits", 1).request(500, 0.001)
    stats.unexpected("digits", "1")
    stats.stats("digits", 1).request(200, 0.001)
    text = metrics.render(stats).decode()
    assert 'forwardpass_requests_total{model="digits",status="500",version="1"} 2.0' in text
    assert 'forwardpass_requests_total{model="digits",status="200",version="1"} 1.0' in text


def test_an_error_naming_a_deeply_nested_input_describes_it_instead_of_recursing():
    deep: list = [1]
    for _ in range(5000):
        deep = [deep]
    error = InvalidInput(("parameters",), "expected an object", shown(deep))
    assert "nested more than 4 levels deep" in error.message
    assert orjson.loads(error_response(error).body)["detail"][0]["input"] == "a list nested more than 4 levels deep"
    assert shown([1, [2, {"a": 3}]]) == [1, [2, {"a": 3}]]
    assert shown(list(range(10_000))) == "a list of 10000 items"
