"""How the Ray Serve ingress finds a request's model (server/ray_serve.py): no Ray needed."""

from __future__ import annotations

import copy

import pytest

from forwardpass.server.ray_serve import model_of


@pytest.mark.parametrize(("path", "body", "found"), [
    ("/v2/models/iris/infer", b"", ("iris", False)),
    ("/v2/models/iris/versions/2/infer", b"", ("iris", False)),
    ("/v1/models/iris:predict", b"", ("iris", False)),
    ("/v1/models/iris/versions/2:predict", b"", ("iris", False)),
    ("/v1/chat/completions", b'{"model": "smollm2", "stream": true}', ("smollm2", True)),
    ("/v1/completions", b'{"model": "smollm2"}', ("smollm2", False)),
    ("/v1/embeddings", b'{"model": "smollm2-embed", "input": "x"}', ("smollm2-embed", False)),
    ("/v1/chat/completions", b"{not json", (None, False)),  # the ingress's own app answers: a 400 naming the body
    ("/v1/chat/completions", b'{"model": 3}', (None, False)),
    ("/v2/models/stats", b"", (None, False)),  # every model's statistics
    ("/", b"", (None, False)),
    ("/ui/app.js", b"", (None, False)),
    ("/v2/health/ready", b"", (None, False)),
])  # fmt: skip
def test_the_model_comes_from_the_path_or_the_body(path, body, found):
    assert model_of(path, body) == found


def test_metrics_of_several_replicas_merge_into_one_exposition():
    from prometheus_client.parser import text_string_to_metric_families

    from forwardpass.server.metrics import merge

    def exposition(model: str, requests: float, inflight: float) -> bytes:
        return (f'# HELP forwardpass_requests_total Inference requests\n# TYPE forwardpass_requests_total counter\n'
                f'forwardpass_requests_total{{model="{model}",status="200"}} {requests}\n'
                f'# HELP forwardpass_inflight_requests In flight\n# TYPE forwardpass_inflight_requests gauge\n'
                f'forwardpass_inflight_requests {inflight}\n').encode()  # fmt: skip

    merged = merge([exposition("iris", 3, 1), exposition("digits", 5, 2)])
    samples = {(s.name, s.labels.get("model")): s.value for f in text_string_to_metric_families(merged.decode())
               for s in f.samples}  # fmt: skip
    assert samples[("forwardpass_requests_total", "iris")] == 3 and samples[("forwardpass_requests_total", "digits")] == 5
    assert samples[("forwardpass_inflight_requests", None)] == 3  # a process-wide gauge: summed
    types = [line for line in merged.splitlines() if line.startswith(b"# TYPE")]
    assert len(types) == len(set(types)) == 2  # one family each, whatever the number of replicas


def test_merged_drift_is_the_worst_process_and_shared_feedback_is_counted_once():
    from prometheus_client.parser import text_string_to_metric_families

    from forwardpass.server.metrics import merge

    def exposition(psi: float, labels: int) -> bytes:
        return (f'# HELP forwardpass_drift_psi PSI\n# TYPE forwardpass_drift_psi gauge\n'
                f'forwardpass_drift_psi{{model="iris",feature="a"}} {psi}\n'
                f'# HELP forwardpass_feedback_labels_total Labels\n# TYPE forwardpass_feedback_labels_total counter\n'
                f'forwardpass_feedback_labels_total{{model="iris"}} {labels}\n').encode()  # fmt: skip

    merged = merge([exposition(0.1, 7), exposition(0.4, 7), exposition(0.2, 7)])  # one database, three readers
    samples = {s.name: s.value for f in text_string_to_metric_families(merged.decode()) for s in f.samples}
    assert samples == {"forwardpass_drift_psi": 0.4, "forwardpass_feedback_labels_total": 7}


class _Handle:
    """A Ray deployment handle's surface as RayIngress uses it, answering as a replica would: ``answer`` whole, or
    ``pieces`` streamed; ``fail`` raised by a whole call, or by a stream once its pieces are out."""

    def __init__(self, answer=None, pieces=(), fail: Exception | None = None):
        self.answer, self.pieces, self.fail = answer, list(pieces), fail
        self.calls: list[tuple[dict, dict]] = []
        self.given: dict = {}
        self.cancelled = False
        self.root = self

    def options(self, **options):
        view = copy.copy(self)  # shares calls and pieces, as a handle's options share its deployment
        view.given = {**self.given, **options}  # as Ray merges them
        return view

    def remote(self, message, *more):
        self.calls.append((self.given, message))
        if self.given.get("stream"):
            return _Stream(self)

        async def whole():
            if self.fail is not None:
                raise self.fail
            return self.answer

        return whole()


class _Stream:
    def __init__(self, handle: _Handle):
        self.handle = handle

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.handle.pieces:
            return self.handle.pieces.pop(0)
        if self.handle.fail is not None:
            raise self.handle.fail
        raise StopAsyncIteration

    def cancel(self):
        self.handle.root.cancelled = True


def _ingress(tmp_path, handles):
    from forwardpass.server.config import ServeConfig
    from forwardpass.server.ray_serve import RayIngress

    repo = tmp_path / "models"
    (repo / "iris").mkdir(parents=True, exist_ok=True)
    return RayIngress.create(ServeConfig(repository=repo, state_dir=tmp_path / "state"), handles)


def _dispatch(app, method, path, body=b"", headers=()):
    import asyncio

    async def go():
        await app.engine.start()
        try:
            response = await app.dispatch({"method": method, "path": path, "query_string": b"a=1",
                                           "headers": list(headers)}, None, body)  # fmt: skip
            chunks = [c async for c in response.chunks] if hasattr(response, "chunks") else None
            return response, chunks
        finally:
            await app.engine.stop(1)

    return asyncio.run(go())


def test_the_ingress_hands_a_models_request_to_its_deployment_and_keeps_the_replicas_headers(tmp_path):
    head = [(b"content-type", b"application/json"), (b"content-length", b"11"), (b"x-forwardpass-replica", b"42")]
    iris = _Handle({"status": 200, "headers": head, "body": b'{"ok":true}'})
    app = _ingress(tmp_path, {"iris": iris})
    response, _ = _dispatch(app, "POST", "/v2/models/iris/infer", b"{}", [(b"x-session-id", b"s1")])
    assert (response.status, response.body, response.content_type) == (200, b'{"ok":true}', "application/json")
    assert response.headers == [(b"x-forwardpass-replica", b"42")]  # length and type are this server's to write
    options, message = iris.calls[0]
    assert options == {"multiplexed_model_id": "s1"}
    assert message == {"method": "POST", "path": "/v2/models/iris/infer", "query": b"a=1",
                       "headers": [(b"x-session-id", b"s1")], "body": b"{}"}  # fmt: skip


def test_a_streamed_chat_is_streamed_through_with_its_headers_once(tmp_path):
    head = {"status": 200, "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]}
    llm = _Handle(pieces=[head, b"data: 1\n\n", b"data: [DONE]\n\n"])
    app = _ingress(tmp_path, {"smollm2": llm})
    response, chunks = _dispatch(app, "POST", "/v1/chat/completions", b'{"model": "smollm2", "stream": true}')
    assert response.status == 200 and response.content_type == "text/event-stream"
    assert chunks == [b"data: 1\n\n", b"data: [DONE]\n\n"]
    assert response.headers == [(b"cache-control", b"no-cache")]  # once, not the replica's copy as well
    assert llm.calls[0][0] == {"stream": True, "multiplexed_model_id": "", "method_name": "stream"}
    assert not llm.cancelled  # it ended: nothing to cancel


def test_a_client_that_leaves_before_reading_cancels_the_ray_stream(tmp_path):
    import asyncio

    head = {"status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    llm = _Handle(pieces=[head, b"data: 1\n\n"])
    app = _ingress(tmp_path, {"smollm2": llm})

    async def go():
        await app.engine.start()
        scope = {"method": "POST", "path": "/v1/chat/completions", "query_string": b"", "headers": []}
        response = await app.dispatch(scope, None, b'{"model": "smollm2", "stream": true}')
        await response.chunks.aclose()  # what the server does with an answer it can no longer send
        await app.engine.stop(1)

    asyncio.run(go())
    assert llm.cancelled


def test_a_stream_that_breaks_midway_ends_with_an_error_event(tmp_path):
    head = {"status": 200, "headers": [(b"content-type", b"text/event-stream")]}

    app = _ingress(tmp_path, {"smollm2": _Handle(pieces=[head, b"data: 1\n\n"], fail=RuntimeError("actor died"))})
    response, chunks = _dispatch(app, "POST", "/v1/chat/completions", b'{"model": "smollm2", "stream": true}')
    assert chunks[0] == b"data: 1\n\n" and b"smollm2" in chunks[1] and chunks[1].endswith(b"data: [DONE]\n\n")


def test_a_gzip_body_is_routed_by_the_model_inside_it(tmp_path):
    import gzip

    answer = {"status": 200, "headers": [(b"content-type", b"application/json")], "body": b"{}"}
    llm = _Handle(answer)
    app = _ingress(tmp_path, {"smollm2": llm})
    body = gzip.compress(b'{"model": "smollm2", "messages": []}')
    response, _ = _dispatch(app, "POST", "/v1/chat/completions", body, [(b"content-encoding", b"gzip")])
    assert response.status == 200 and llm.calls[0][1]["body"] == body  # routed, and handed over as it came


def test_the_server_is_ready_when_every_deployment_is(tmp_path):
    ready = {"status": 200, "headers": [(b"content-type", b"application/json")], "body": b"{}"}
    app = _ingress(tmp_path, {"iris": _Handle(ready), "digits": _Handle(fail=RuntimeError("starting"))})
    response, _ = _dispatch(app, "GET", "/v2/health/ready")
    assert response.status == 503 and b"digits" in response.body and b"iris" not in response.body
    app = _ingress(tmp_path, {"iris": _Handle(ready)})
    assert _dispatch(app, "GET", "/v2/health/ready")[0].status == 200


def test_a_failed_deployment_is_a_503_naming_the_model_and_unknown_models_get_the_apps_own_404(tmp_path):
    app = _ingress(tmp_path, {"iris": _Handle(fail=RuntimeError("actor died"))})
    response, _ = _dispatch(app, "POST", "/v2/models/iris/infer", b"{}")
    assert response.status == 503 and b"iris" in response.body and b"RuntimeError" in response.body
    missing, _ = _dispatch(app, "POST", "/v2/models/nope/infer", b"{}")
    assert missing.status == 404 and b"nope" in missing.body


def test_a_stream_is_accepted_here_and_its_frames_go_to_one_replica_of_the_model(tmp_path):
    import asyncio

    from forwardpass.errors import ForwardpassError

    vad = _Handle('{"outputs": []}')
    app = _ingress(tmp_path, {"silero-vad": vad, "smollm2": _Handle()})
    app.language_models = {"smollm2"}
    assert app.accept_stream({"path": "/v2/models/silero-vad/stream", "headers": [], "query_string": b""}) == (
        "silero-vad", None, "none")
    for path, status in (("/v2/models/nope/stream", 404), ("/v2/models/smollm2/stream", 400)):
        with pytest.raises(ForwardpassError) as refused:
            app.accept_stream({"path": path, "headers": [], "query_string": b""})
        assert refused.value.status == status

    async def go():
        frames = app.frames("silero-vad", None)
        answers = [await frames.answer({"frame": i}, 0) for i in range(2)]
        await frames.end()
        return frames.key, answers

    key, answers = asyncio.run(go())
    assert answers == ['{"outputs": []}'] * 2
    assert [(c[0]["method_name"], c[0]["multiplexed_model_id"], c[1]) for c in vad.calls] == [
        ("frame", key, key), ("frame", key, key), ("end_stream", key, key)]  # one connection: one replica
