"""Stateful models (model.yaml ``sequence:``): Triton's sequence semantics over V2, per-sequence state kept by the
engine, steps of different sequences batched, states freed at the end, after an idle timeout, and bounded."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from fixtures import save
from fixtures.inprocess import InProcess, SocketServer
from onnx import TensorProto, helper

from forwardpass.server.config import ServeConfig


def _accumulator() -> object:
    """INPUT, START, CORRID, ACC int32 [N, 1] -> OUTPUT = INPUT if START else ACC + INPUT; NEXT = OUTPUT; ID = CORRID."""
    i32 = TensorProto.INT32
    graph = helper.make_graph(
        [helper.make_node("Add", ["ACC", "INPUT"], ["sum"]),
         helper.make_node("Cast", ["START"], ["first"], to=TensorProto.BOOL),
         helper.make_node("Where", ["first", "INPUT", "sum"], ["OUTPUT"]),
         helper.make_node("Identity", ["OUTPUT"], ["NEXT"]),
         helper.make_node("Identity", ["CORRID"], ["ID"])],  # fmt: skip
        "accumulator",
        [helper.make_tensor_value_info(n, i32, ["N", 1]) for n in ("INPUT", "START", "CORRID", "ACC")],
        [helper.make_tensor_value_info(n, i32, ["N", 1]) for n in ("OUTPUT", "NEXT", "ID")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


SEQUENCE = {"state": [{"input": "ACC", "output": "NEXT"}],
            "control": [{"input": "START", "kind": "start"}, {"input": "CORRID", "kind": "corrid"}],
            "max_sequences": 3}  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    folder = tmp_path / "acc"
    folder.mkdir()
    (folder / "model.yaml").write_text(yaml.safe_dump({"task": "custom", "sequence": SEQUENCE,
                                                       "batching": {"max_queue_delay_ms": 5}}))  # fmt: skip
    save(_accumulator(), folder / "1" / "model.onnx")
    return tmp_path


def _step(app: InProcess, sid: object, value: int, start: bool = False, end: bool = False) -> dict:
    body = {"inputs": [{"name": "INPUT", "datatype": "INT32", "shape": [1, 1], "data": [value]}],
            "parameters": {"sequence_id": sid, "sequence_start": start, "sequence_end": end}}  # fmt: skip
    answer = app.post("/v2/models/acc/infer", json=body)
    return {"status": answer.status_code, **answer.json()}


def _value(answer: dict, name: str = "OUTPUT") -> int:
    return next(o["data"][0] for o in answer["outputs"] if o["name"] == name)


def test_tritonclient_sequences_give_each_id_its_running_sums(repo):
    """Triton's simple sequence client: two interleaved sequence ids, start and end flags, running sums back."""
    import tritonclient.http as httpclient

    with SocketServer(ServeConfig(repository=repo, poll_interval=0)) as server:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        values = [11, 7, 5, 3, 2, 0, 1]
        sums: dict[int, list[int]] = {1000: [], 1001: []}
        for i, value in enumerate(values):
            for sid, sign in ((1000, 1), (1001, -1)):
                tensor = httpclient.InferInput("INPUT", [1, 1], "INT32")
                tensor.set_data_from_numpy(np.array([[sign * value]], np.int32))
                result = client.infer("acc", [tensor], sequence_id=sid, sequence_start=i == 0,
                                      sequence_end=i == len(values) - 1)  # fmt: skip
                sums[sid].append(int(result.as_numpy("OUTPUT")[0, 0]))
                assert int(result.as_numpy("ID")[0, 0]) == sid  # CORRID carries the sequence id
                assert result.as_numpy("NEXT") is None  # the next state stays in the server
        assert sums[1000] == list(np.cumsum(values)) and sums[1001] == list(-np.cumsum(values))
        # both ended: a further step of either is a 400 naming it
        tensor = httpclient.InferInput("INPUT", [1, 1], "INT32")
        tensor.set_data_from_numpy(np.array([[1]], np.int32))
        with pytest.raises(Exception, match="no live sequence 1000"):
            client.infer("acc", [tensor], sequence_id=1000)
        client.close()


def test_interleaved_sequences_equal_each_alone_and_start_resets(repo):
    with InProcess(ServeConfig(repository=repo, poll_interval=0)) as app:
        alone = [_value(_step(app, 1, v, start=i == 0)) for i, v in enumerate([3, 4, 5])]
        a, b = [], []
        for i, (x, y) in enumerate(zip([3, 4, 5], [10, 20, 30])):
            a.append(_value(_step(app, 7, x, start=i == 0)))
            b.append(_value(_step(app, 8, y, start=i == 0)))
        assert a == alone == [3, 7, 12] and b == [10, 30, 60]
        assert _value(_step(app, 7, 1, start=True)) == 1  # a new start resets the state


def test_concurrent_steps_of_different_sequences_batch_and_keep_their_own_state(repo):
    with InProcess(ServeConfig(repository=repo, poll_interval=0)) as app:
        for sid in (1, 2, 3):
            assert _value(_step(app, sid, sid * 100, start=True)) == sid * 100
        body = lambda sid: {"inputs": [{"name": "INPUT", "datatype": "INT32", "shape": [1, 1], "data": [sid]}],  # noqa: E731
                            "parameters": {"sequence_id": sid}}  # fmt: skip
        for _ in range(3):
            answers = app.gather(*[("POST", "/v2/models/acc/infer", {"json": body(sid)}) for sid in (1, 2, 3)])
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        final = {sid: _value(_step(app, sid, 0)) for sid in (1, 2, 3)}
        assert final == {sid: sid * 100 + 3 * sid for sid in (1, 2, 3)}
        metrics = app.get("/metrics").text
        assert 'forwardpass_sequences_live{model="acc",version="1"} 3.0' in metrics
        stats = app.get("/v2/models/acc/stats").json()["model_stats"][0]
        assert stats["execution_count"] < stats["inference_count"]  # some steps ran in one forward pass


def test_end_frees_the_state_and_the_live_bound_is_a_clear_503(repo):
    with InProcess(ServeConfig(repository=repo, poll_interval=0)) as app:
        for sid in (1, 2, 3):
            assert _step(app, sid, 1, start=True)["status"] == 200
        refused = _step(app, 4, 1, start=True)
        assert refused["status"] == 503 and "3 live sequences" in refused["error"]
        assert "sequence.max_sequences" in refused["error"]
        assert _step(app, 2, 1, end=True)["status"] == 200  # ends sequence 2: its state goes
        assert 'forwardpass_sequences_live{model="acc",version="1"} 2.0' in app.get("/metrics").text
        assert _step(app, 4, 1, start=True)["status"] == 200  # room again
        gone = _step(app, 2, 1)
        assert gone["status"] == 400 and gone["detail"][0]["loc"] == ["parameters", "sequence_id"]
        assert "no live sequence 2" in gone["error"]


def test_requests_that_misuse_sequences_get_400s_naming_the_field(repo, demo_repo):
    shutil.copytree(demo_repo / "iris", repo / "iris")
    with InProcess(ServeConfig(repository=repo, poll_interval=0)) as app:
        plain = {"inputs": [{"name": "INPUT", "datatype": "INT32", "shape": [1, 1], "data": [1]}]}
        missing = app.post("/v2/models/acc/infer", json=plain).json()
        assert missing["detail"][0]["loc"] == ["parameters", "sequence_id"] and "is stateful" in missing["error"]
        state_sent = app.post("/v2/models/acc/infer", json={
            "inputs": [*plain["inputs"], {"name": "ACC", "datatype": "INT32", "shape": [1, 1], "data": [5]}],
            "parameters": {"sequence_id": 9, "sequence_start": True}}).json()  # fmt: skip
        assert state_sent["detail"][0]["loc"] == ["inputs", "ACC"] and "feeds this input itself" in state_sent["error"]
        bad_flag = _step(app, 9, 1, start="yes")  # type: ignore[arg-type]
        assert bad_flag["detail"][0]["loc"] == ["parameters", "sequence_start"]
        not_int = _step(app, "abc", 1, start=True)  # CORRID is INT32: the id must be an integer
        assert not_int["status"] == 400 and "send an integer id" in not_int["error"]
        iris = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}],
                "parameters": {"sequence_id": 3}}  # fmt: skip
        stateless = app.post("/v2/models/iris/infer", json=iris).json()
        assert stateless["detail"][0]["loc"] == ["parameters", "sequence_id"] and "keeps no state" in stateless["error"]


def test_a_state_idle_past_its_timeout_is_freed(repo):
    config = yaml.safe_load((repo / "acc" / "model.yaml").read_text())
    config["sequence"]["idle_timeout_s"] = 0.2
    (repo / "acc" / "model.yaml").write_text(yaml.safe_dump(config))
    with InProcess(ServeConfig(repository=repo, poll_interval=0)) as app:
        assert _step(app, 5, 1, start=True)["status"] == 200
        assert 'forwardpass_sequences_live{model="acc",version="1"} 1.0' in app.get("/metrics").text
        import time

        deadline = time.monotonic() + 5
        while 'forwardpass_sequences_live{model="acc",version="1"} 0.0' not in app.get("/metrics").text:
            assert time.monotonic() < deadline, "the idle sequence was not freed"
            time.sleep(0.05)
        assert "no live sequence 5" in _step(app, 5, 1)["error"]


def test_silero_vad_state_on_its_batch_axis_interleaved_equals_alone(demo_repo, tmp_path):
    """The demo's VAD with its two states (the recurrent [2, batch, 128] on batch_axis 1, and the last 64
    samples [batch, 64]) and its constant sr: two streams stepped together give each stream's results alone."""
    if not (demo_repo / "silero-vad").is_dir():
        pytest.skip("silero-vad is not installed")
    shutil.copytree(demo_repo / "silero-vad", tmp_path / "vad")
    rng = np.random.default_rng(0)
    chunks = {sid: [(rng.standard_normal(512) * 0.1 * sid).astype(np.float32) for _ in range(4)] for sid in (1, 2)}

    def body(sid: int, chunk: np.ndarray, start: bool) -> dict:
        return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 512], "data": chunk.tolist()}],
                "parameters": {"sequence_id": sid, "sequence_start": start}}

    with InProcess(ServeConfig(repository=tmp_path, poll_interval=0)) as app:
        def probabilities(answer) -> float:
            assert answer.status_code == 200, answer.text
            return next(o["data"][0] for o in answer.json()["outputs"] if o["name"] == "output")

        alone = {sid: [probabilities(app.post("/v2/models/vad/infer", json=body(100 + sid, c, i == 0)))
                       for i, c in enumerate(chunks[sid])] for sid in (1, 2)}  # fmt: skip
        together: dict[int, list[float]] = {1: [], 2: []}
        for i in range(4):
            answers = app.gather(*[("POST", "/v2/models/vad/infer", {"json": body(sid, chunks[sid][i], i == 0)})
                                   for sid in (1, 2)])  # fmt: skip
            for sid, answer in zip((1, 2), answers):
                together[sid].append(probabilities(answer))
        for sid in (1, 2):
            np.testing.assert_allclose(together[sid], alone[sid], rtol=1e-5, atol=1e-6)


def _speech_model(folder: Path, events: dict) -> None:
    """P float [N, 1] -> PROB = P, a counter state kept beside it: a 'VAD' whose probabilities the test writes."""
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Identity", ["P"], ["PROB"]), helper.make_node("Identity", ["C"], ["CN"])],
        "speech",
        [helper.make_tensor_value_info("P", f32, ["N", 1]), helper.make_tensor_value_info("C", f32, ["N", 1])],
        [helper.make_tensor_value_info("PROB", f32, ["N", 1]), helper.make_tensor_value_info("CN", f32, ["N", 1])],
    )
    config = {"task": "custom", "sequence": {"state": [{"input": "C", "output": "CN"}], "events": events}}
    (folder / "model.yaml").write_text(yaml.safe_dump(config))
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "1" / "model.onnx")


def test_speech_events_come_with_the_step_that_completes_them_and_the_end_closes_an_open_segment(tmp_path):
    """sequence.events (kind speech): silero's hysteresis per sequence, answered as the BYTES output 'events'
    over plain V2; two interleaved sequences keep their own detectors."""
    (tmp_path / "vad").mkdir()
    _speech_model(tmp_path / "vad", {"kind": "speech", "output": "PROB"})
    # 0.9 x 10 windows of 32 ms, then silence: the start is announced once speech passes 250 ms (the 8th
    # window's step, before the speech ended), the end at the first step 100 ms into the silence (the 5th:
    # 4 x 32 ms), back-dated to where the silence began and padded by 30 ms
    first = [0.0] * 3 + [0.9] * 10 + [0.0] * 6
    second = [0.0] + [0.9] * 12  # still speaking when its sequence ends: the last step closes it
    with InProcess(ServeConfig(repository=tmp_path, poll_interval=0)) as app:

        def step(sid: int, p: float, start: bool, end: bool) -> list[dict]:
            body = {"inputs": [{"name": "P", "datatype": "FP32", "shape": [1, 1], "data": [p]}],
                    "parameters": {"sequence_id": sid, "sequence_start": start, "sequence_end": end}}  # fmt: skip
            answer = app.post("/v2/models/vad/infer", json=body)
            assert answer.status_code == 200, answer.text
            outputs = {o["name"]: o for o in answer.json()["outputs"]}
            assert set(outputs) == {"PROB", "events"} and outputs["events"]["datatype"] == "BYTES"
            return [__import__("json").loads(e) for e in outputs["events"]["data"]]

        heard: dict[int, list[tuple[int, dict]]] = {1: [], 2: []}
        for i in range(max(len(first), len(second))):
            for sid, probs in ((1, first), (2, second)):
                if i < len(probs):
                    heard[sid] += [(i, e) for e in step(sid, probs[i], i == 0, i == len(probs) - 1)]
        assert heard[1] == [(10, {"event": "start", "time": pytest.approx(3 * 0.032 - 0.03)}),
                            (17, {"event": "end", "time": pytest.approx(13 * 0.032 + 0.03)})]  # fmt: skip
        assert heard[2] == [(8, {"event": "start", "time": pytest.approx(0.032 - 0.03)}),
                            (12, {"event": "end", "time": pytest.approx(13 * 0.032)})]  # fmt: skip
        meta = app.get("/v2/models/vad").json()  # what a request sends and gets: the state stays in the server
        assert [i["name"] for i in meta["inputs"]] == ["P"]
        assert meta["outputs"] == [{"name": "PROB", "datatype": "FP32", "shape": [-1, 1]},
                                   {"name": "events", "datatype": "BYTES", "shape": [-1]}]  # fmt: skip
        # asked for by name alone
        body = {"inputs": [{"name": "P", "datatype": "FP32", "shape": [1, 1], "data": [0.1]}],
                "outputs": [{"name": "events"}], "parameters": {"sequence_id": 3, "sequence_start": True}}  # fmt: skip
        answer = app.post("/v2/models/vad/infer", json=body)
        assert answer.status_code == 200 and [o["name"] for o in answer.json()["outputs"]] == ["events"]


def test_speech_events_over_an_output_the_model_lacks_fail_its_load_naming_the_field(tmp_path):
    (tmp_path / "vad").mkdir()
    _speech_model(tmp_path / "vad", {"kind": "speech", "output": "SCORE"})
    with InProcess(ServeConfig(repository=tmp_path, poll_interval=0)) as app:
        index = app.post("/v2/repository/index", json={}).json()
        reason = next(m for m in index if m["name"] == "vad")["reason"]
        assert "sequence.events.output: 'SCORE' is not an answered output" in reason, reason
