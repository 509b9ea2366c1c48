"""One table of bad inputs, every entrypoint: the Python API, the CLI, V2 infer, :predict and batch answer
each with the same error (kind, loc and message), because they all reach the model through the same checks.

V2 carries tensors, so it takes the rows whose bad input is a tensor; batch writes the row's error
without its ``instances[i]`` prefix (the row is its own field there), which is all it leaves out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures import copy_models, save
from fixtures.inprocess import InProcess
from onnx import TensorProto, helper, numpy_helper

import forwardpass
import forwardpass.batch
from forwardpass.errors import InvalidInput, format_loc
from forwardpass.server.config import ServeConfig

IRIS_ROW = {"sepal length (cm)": 5.1, "sepal width (cm)": 3.5, "petal length (cm)": 1.4, "petal width (cm)": 0.2}
VOCAB = 10

# (case, model, instances, V2 tensor or None where V2 cannot say it)
CASES = [
    ("a string for a number", "iris", [{**IRIS_ROW, "sepal width (cm)": "wide"}], None),
    ("a feature left out", "iris", [{k: v for k, v in IRIS_ROW.items() if k != "petal width (cm)"}], None),
    ("a missing value", "iris", [{**IRIS_ROW, "petal length (cm)": None}], None),
    ("a token id past the vocabulary", "tokens", [[1, 2, 3, VOCAB + 5]],
     {"name": "ids", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, VOCAB + 5]}),
    ("a row of the wrong length", "tokens", [[1, 2, 3, 4, 5]], None),
    ("an input the model does not take", "tokens", [{"ids": [1, 2, 3, 4], "mask": [1, 1, 1, 1]}], None),
    ("a float for a token id", "tokens", [[1, 2, 3.5, 4]], None),
]


def _tokens_model() -> Any:
    """ids int64 [N, 4] -> logits [N, 2]: a Gather of an embedding, so an id past the table is ONNX Runtime's refusal."""
    table = numpy_helper.from_array(np.random.default_rng(0).normal(size=(VOCAB, 2)).astype(np.float32), "E")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["emb"]),
         helper.make_node("ReduceSum", ["emb", "axes"], ["logits"], keepdims=0)],  # fmt: skip
        "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [table, axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_models(demo_repo, tmp_path_factory.mktemp("same-errors"), "iris")
    (root / "tokens").mkdir()
    (root / "tokens" / "model.yaml").write_text("task: custom\ncache: {enabled: false}\n")
    save(_tokens_model(), root / "tokens" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def server(repo: Path):
    with InProcess(ServeConfig(repository=repo, poll_interval=0)) as app:
        yield app


@pytest.fixture(scope="module")
def expected(repo: Path) -> dict[str, InvalidInput]:
    """What the Python API raises for each case: the reference the other entrypoints are held to."""
    out = {}
    for case, model, instances, _ in CASES:
        with pytest.raises(InvalidInput) as raised:
            forwardpass.load(model, repository=repo).predict(instances)
        out[case] = raised.value
    return out


def _triple(error: InvalidInput) -> tuple[str, list[Any], str]:
    return error.type, list(error.loc), error.msg


@pytest.mark.parametrize("case, model, instances, tensor", CASES, ids=[c[0] for c in CASES])
def test_predict_endpoint_gives_the_python_error(server, expected, case, model, instances, tensor):
    answer = server.post(f"/v1/models/{model}:predict", json={"instances": instances})
    assert answer.status_code == 400, answer.text
    body = answer.json()
    (detail,) = body["detail"]
    assert (body["type"], detail["loc"], detail["msg"]) == _triple(expected[case])
    assert body["error"] == expected[case].message


@pytest.mark.parametrize("case, model, instances, tensor", [c for c in CASES if c[3]], ids=[c[0] for c in CASES if c[3]])
def test_v2_infer_gives_the_python_error(server, expected, case, model, instances, tensor):
    answer = server.post(f"/v2/models/{model}/infer", json={"inputs": [tensor]})
    assert answer.status_code == 400, answer.text
    body = answer.json()
    (detail,) = body["detail"]
    # the Python API calls the request "instances"; V2's tensors are "inputs" already
    reference = expected[case]
    assert (body["type"], detail["loc"], detail["msg"]) == _triple(reference)
    assert body["error"] == reference.message


@pytest.mark.parametrize("case, model, instances, tensor", CASES, ids=[c[0] for c in CASES])
def test_cli_gives_the_python_error(repo, expected, cli, case, model, instances, tensor):
    done = cli("predict", model, json.dumps(instances), "-r", str(repo))  # the console script's entry point
    assert done.returncode == 2, done.stdout + done.stderr
    assert " ".join(done.stderr.split()) == f"error: {expected[case].message}"


@pytest.mark.parametrize("case, model, instances, tensor", CASES, ids=[c[0] for c in CASES])
def test_batch_gives_the_python_error_for_the_row(repo, expected, tmp_path, case, model, instances, tensor):
    rows = [IRIS_ROW, *instances] if model == "iris" else [[1, 2, 3, 4], *instances]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r if isinstance(r, dict) else {"ids": r}) + "\n" for r in rows))
    summary = forwardpass.batch.run(model, source, tmp_path / "out", repository=repo, fmt="jsonl")
    assert (summary.rows_ok, summary.rows_failed) == (1, 1)
    (error,) = [json.loads(line) for line in (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()]
    reference = expected[case]
    loc = reference.loc[2:] if reference.loc[:1] == ("instances",) else reference.loc
    got = "" if reference.input is InvalidInput._MISSING else f" (got {reference.input!r:.80})"
    assert error["row"] == 1
    assert error["error"] == (f"{format_loc(loc)}: " if loc else "") + reference.msg + got
