"""forwardpass on Ray Serve, for when one machine is not enough: ``forwardpass serve --ray [--ray-address ADDR]``.

Each model of the repository is a Ray Serve application with one deployment, ``fp-<model>``. Each of its
replicas runs the same ``App`` that ``forwardpass serve`` runs (engine, data plane, every route), over a
repository in which it loads that model alone, so a request is answered by exactly the code that answers it
on one machine.

The HTTP server is forwardpass's own, in the process that deployed the models (``RayIngress``); Ray Serve's
HTTP proxy is not started, which saves a hop. It finds each request's model
- from the path, for V2 and ``:predict``;
- from the JSON body's ``model``, for the OpenAI routes;
hands the request (method, path, query, headers, body) to that model's deployment through a Ray handle, and
writes the answer back, server-sent events streamed as they come. Requests that name no model (the
dashboard, health) are answered by the ingress itself; listings (``/v1/models``, the dashboard's models,
``/metrics``) are gathered from every deployment.

Replicas scale between model.yaml's ``scale.min_replicas`` and ``max_replicas``, on
``target_ongoing_requests``. A language model keeps its continuous batching inside a replica. A request
with an ``x-session-id`` header goes to the replica that served that session before, where its prefix
cache is: Ray Serve's multiplexed-model routing, keyed by the session.

WebSocket streams (``/v2/models/{m}/stream``) are accepted here (the key checked here) and each frame is one
Ray call to the model's deployment, every frame of a connection to one replica (where a stateful model's
sequence lives). Not carried over: ``/metrics`` holds one replica of each deployment, the one that answered;
stored responses (``GET /v1/responses/{id}``) live in the replica that made them, which that request cannot
name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson

from forwardpass._deps import require
from forwardpass.engine.registry import language_model_elsewhere
from forwardpass.errors import ForwardpassError, ModelNotFound, ModelNotReady
from forwardpass.repository import Repository
from forwardpass.server import metrics, stream
from forwardpass.server.app import App
from forwardpass.server.config import ServeConfig
from forwardpass.server.errors import error_response, openai_error
from forwardpass.server.http import Response, StreamingResponse, decode_body
from forwardpass.tasks import TASKS

log = logging.getLogger("forwardpass.ray")

_BY_PATH = re.compile(r"/v2/models/(?P<v2>[^/]+)|/v1/models/(?P<v1>[^/:]+)")
_BY_BODY = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/tokenize", "/detokenize"}
_NOT_MODELS = {"stats"}  # /v2/models/stats: every model's statistics, not a model
SESSION_HEADER = b"x-session-id"


def model_of(path: str, body: bytes) -> tuple[str | None, bool]:
    """(the model a request is for, whether it asks for a streamed answer); None for requests about no one model
    (health, the dashboard, listings)."""
    if path in _BY_BODY:
        try:
            doc = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return None, False  # the ingress's own app answers with the usual 400
        name = doc.get("model") if isinstance(doc, dict) else None
        return (name if isinstance(name, str) else None), isinstance(doc, dict) and doc.get("stream") is True
    found = _BY_PATH.match(path)
    if found is None:
        return None, False
    name = found.group("v2") or found.group("v1")
    return (None if name in _NOT_MODELS else name), False


def deployment_name(model: str) -> str:
    return f"fp-{model}"


class ModelReplica:
    """One replica of one model's deployment: the server's App over a repository that loads that model only."""

    def __init__(self, settings: dict[str, Any], model: str):
        from forwardpass.server.app import create_app

        config = ServeConfig.model_validate({**settings, "model_control": "explicit", "load_model": [model],
                                             "poll_interval": 0})  # fmt: skip
        self.model = model
        self.app = create_app(config)
        self._streams: dict[str, Any] = {}  # WebSocket connections' frames (EngineFrames), by the ingress's key
        self._started: asyncio.Task[None] | None = None
        try:  # load the model now when the replica's loop runs already, not on its first request
            asyncio.get_running_loop()
            self._started = asyncio.ensure_future(self.app.engine.start())
        except RuntimeError:
            pass

    async def _ready(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self.app.engine.start())
        await self._started

    async def remember(self, session: str) -> str:
        """The session becomes this replica's, so that its next requests come here (made Ray Serve's multiplexed
        loader in _replica_class)."""
        return session

    async def _parts(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        from ray import serve

        await self._ready()
        session = serve.get_multiplexed_model_id()
        if session:
            await self.remember(session)
        async for part in _parts(self.app, request, [(b"x-forwardpass-replica", str(os.getpid()).encode())]):
            yield part

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        """The whole answer to one HTTP request: {status, headers, body} (one Ray call: the cheap path)."""
        parts = [part async for part in self._parts(request)]  # a streamed answer asked for whole: gathered
        return {**parts[0], "body": b"".join(parts[1:])}

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        """A streamed answer (server-sent events): first {status, headers}, then the body, a piece at a time."""
        async for part in self._parts(request):
            yield part

    async def frame(self, key: str, version: int | None, request: Any, skipped: int) -> str | bytes:
        """One frame of a WebSocket stream the ingress accepted: answered by this replica's engine, in the
        connection's sequence (every frame of a connection comes here: its key is the multiplexed id)."""
        from ray import serve

        from forwardpass.server.stream import EngineFrames

        await self._ready()
        await self.remember(serve.get_multiplexed_model_id())
        frames = self._streams.get(key)
        if frames is None:
            try:
                frames = self._streams[key] = EngineFrames(self.app.engine, self.model, version)
            except ForwardpassError as exc:  # unloaded, say: this frame's answer says so
                return stream.error_frame(exc)
        return await frames.answer(request, skipped)

    async def sequence(self, key: str, version: int | None, mailbox: Any) -> AsyncIterator[str | bytes]:
        """A stateful model's WebSocket connection, whole: its frames taken from the mailbox one at a time (until
        None), each answered in this one sequence."""
        from forwardpass.server.stream import EngineFrames

        await self._ready()
        try:
            frames = EngineFrames(self.app.engine, self.model, version)
        except ForwardpassError as exc:
            error = stream.error_frame(exc)
            while await mailbox.get.remote(key) is not None:
                yield error
            return
        try:
            while (item := await mailbox.get.remote(key)) is not None:
                yield await frames.answer(*item)
        finally:
            await frames.end()

    async def end_stream(self, key: str) -> None:
        frames = self._streams.pop(key, None)
        if frames is not None:
            await frames.end()

    def check_health(self) -> None:
        if self._started is not None and self._started.done() and self._started.exception() is not None:
            raise RuntimeError(f"{self.model} did not start: {self._started.exception()}")


class RayIngress(App):
    """The HTTP side of ``forwardpass serve --ray``: forwardpass's own server, in the process that deployed the
    models, hands each request for a model to that model's deployment through a Ray handle (one Ray call: Ray
    Serve's HTTP proxy, a second hop, is not started), and answers the rest itself: the dashboard's page and
    files, health, listings gathered from every deployment, errors in each API's shape."""

    def __init__(self, engine: Any, config: ServeConfig, handles: dict[str, Any], mailbox: Any = None):
        super().__init__(engine, config)
        self.handles, self.mailbox = handles, mailbox
        self.language_models: set[str] = set()  # no frames for these: refused a stream, as on one machine
        self.stateful: set[str] = set()  # a connection is one sequence: all its frames on one replica
        for name in handles:
            try:
                found = engine.repository.config(name)
            except ForwardpassError:
                continue  # its deployment answers for it
            if TASKS[found.task].generative:
                self.language_models.add(name)
            if found.sequence is not None:
                self.stateful.add(name)

    @classmethod
    def create(cls, config: ServeConfig, handles: dict[str, Any], mailbox: Any = None) -> RayIngress:
        """Over the repository with no model loaded here: each is its deployment's."""
        from forwardpass.server.app import create_app

        local = create_app(config.model_copy(update={"model_control": "explicit", "load_model": [], "poll_interval": 0,
                                                     "workers": 1}))
        return cls(local.engine, local.config, handles, mailbox)

    async def dispatch(self, scope: dict[str, Any], receive: Any, body: bytes | None) -> Response | StreamingResponse:
        body = body or b""
        path = scope["path"]
        if scope["method"] == "GET" and path in _GATHERED:  # about every model: each deployment's own part
            try:
                return await self._gather(scope, body)
            except Exception as exc:  # a malformed answer, say: an error in the usual shape, never a raise
                return error_response(exc, self.engine.stats)
        model, streamed = await self._route(path, scope["headers"], body)
        if model is None or model not in self.handles:  # no model, or none of the repository's: our own answer
            return await super().dispatch(scope, receive, body)  # (a 404 naming it, an error in the API's shape)
        handle = self.handles[model]
        message = _message(scope, body)
        session = next((v for k, v in scope["headers"] if k == SESSION_HEADER), b"")[:200].decode("latin-1")
        try:
            if not streamed:
                whole = await handle.options(multiplexed_model_id=session).remote(message)
                return _response(whole, whole["body"])
            parts = handle.options(stream=True, multiplexed_model_id=session, method_name="stream").remote(message)
            chunks = _RayChunks(parts, model)
            try:
                head = await parts.__anext__()
            except BaseException:
                await chunks.aclose()
                raise
            return _response(head, chunks)
        except Exception as exc:  # the deployment failed or went away: the client hears which, not a 500
            log.warning("ray: %s: %s", deployment_name(model), exc)
            failed = ModelNotReady(f"model {model!r} did not answer through Ray Serve ({type(exc).__name__}); "
                                   "retry, or see the Ray logs")  # fmt: skip
            return openai_error(failed) if path.startswith("/v1/") and path in _BY_BODY else error_response(failed)

    async def _route(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[str | None, bool]:
        """model_of, on the body as the model's app will read it (a compressed one undone first, for routing only);
        a large body is parsed off the event loop, which other requests share."""
        if path not in _BY_BODY:
            return model_of(path, b"")
        encoding = next((v for k, v in headers if k == b"content-encoding"), b"").decode("latin-1").strip()
        if not encoding and len(body) < 65536:
            return model_of(path, body)

        def parse() -> tuple[str | None, bool]:
            try:
                plain = decode_body(body, encoding, self.config.max_body_bytes) if encoding else body
            except ForwardpassError:
                return None, False  # our own app answers, with the error that names the encoding
            return model_of(path, plain)

        return await asyncio.to_thread(parse)

    def check_streamable(self, model: str, version: int | None) -> None:
        """Known from the repository here (the model is loaded by its deployment, which answers the frames)."""
        if model not in self.handles:
            raise ModelNotFound(f"model '{model}' is not in the repository")
        if model in self.language_models:
            raise language_model_elsewhere(model)

    def frames(self, model: str, version: int | None) -> stream.Frames:
        if model in self.stateful and self.mailbox is not None:
            return _RaySequence(self.handles[model], self.mailbox, model, version)
        return _RayFrames(self.handles[model], model, version)

    async def _gather(self, scope: dict[str, Any], body: bytes) -> Response:
        """Readiness, /ui/api/models, /v1/models and /metrics over every deployment: each knows its own model (it
        loads no other). The key is checked here first; a deployment that does not answer in GATHER_SECONDS (one
        scaled to zero, starting) is left out, and the server is not ready until every one is."""
        local = await super().dispatch(scope, None, body)
        if local.status != 200 or isinstance(local, StreamingResponse):  # a key refused, say: that answer alone
            return local  # type: ignore[return-value]
        path, message = scope["path"], _message(scope, body)
        names = list(self.handles)

        async def ask(name: str) -> Any:
            return await asyncio.wait_for(self.handles[name].remote(message), GATHER_SECONDS)

        answers = await asyncio.gather(*(ask(n) for n in names), return_exceptions=True)
        ok = {n: a for n, a in zip(names, answers) if isinstance(a, dict) and a["status"] == 200}
        if path == "/v2/health/ready":
            if len(ok) == len(names):
                return local
            return Response.json({"error": "not ready: " + ", ".join(sorted(set(names) - set(ok)))}, 503)
        if path == "/metrics":  # each deployment's (one replica's) metrics, one exposition
            merged = await asyncio.to_thread(metrics.merge, [local.body, *(a["body"] for a in ok.values())])
            return Response(200, merged, local.content_type)
        doc = orjson.loads(local.body)
        if path == "/v1/models":
            listed = [m for a in ok.values() for m in orjson.loads(a["body"])["data"]]
            doc["data"] = sorted({m["id"]: m for m in listed}.values(), key=lambda m: m["id"])
        else:
            own = {}
            for name, answer in ok.items():
                own.update({m["name"]: m for m in orjson.loads(answer["body"])["models"] if m["name"] == name})
            doc["models"] = [own.get(m["name"], m) for m in doc["models"]]
        return Response.json(doc, headers=local.headers)


GATHER_SECONDS = 10.0
_GATHERED = {"/v2/health/ready", "/ui/api/models", "/v1/models", "/metrics"}


def _message(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    """A request as it is handed to a deployment (Ray pickles it)."""
    return {"method": scope["method"], "path": scope["path"], "query": scope.get("query_string", b""),
            "headers": list(scope["headers"]), "body": body}  # fmt: skip


_HOP = {b"content-type", b"content-length", b"transfer-encoding", b"cache-control", b"connection"}


def _response(head: dict[str, Any], body: bytes | AsyncIterator[bytes]) -> Response | StreamingResponse:
    """A deployment's answer ({status, headers} and the body: bytes, or pieces to stream) as this server's."""
    headers = head["headers"]
    kind = next((v for k, v in headers if k == b"content-type"), b"application/octet-stream").decode("latin-1")
    kept = [(k, v) for k, v in headers if k not in _HOP]
    if isinstance(body, bytes):
        return Response(head["status"], body, kind, kept)
    return StreamingResponse(body, head["status"], kind, kept)


class _RayFrames:
    """A WebSocket connection's frames, each one Ray call to the model's deployment; all of them go to one
    replica (the connection's key is the multiplexed id), where a stateful model's sequence lives."""

    _count = 0

    def __init__(self, handle: Any, model: str, version: int | None):
        _RayFrames._count += 1
        self.key = f"stream-{os.getpid()}-{_RayFrames._count}"
        self.handle, self.model, self.version = handle.options(multiplexed_model_id=self.key), model, version

    async def answer(self, request: Any, skipped: int) -> str | bytes:
        try:
            answer: str | bytes = await self.handle.options(method_name="frame").remote(self.key, self.version,
                                                                                       request, skipped)  # fmt: skip
        except Exception as exc:  # the deployment failed: this frame's answer says so, the stream goes on
            log.warning("ray: %s: a stream frame failed: %s", deployment_name(self.model), exc)
            return _unanswered(self.model, exc)
        return answer

    async def end(self) -> None:
        try:
            await self.handle.options(method_name="end_stream").remote(self.key)
        except Exception as exc:  # a replica gone takes its sequences with it
            log.warning("ray: %s: ending a stream failed: %s", deployment_name(self.model), exc)


def _unanswered(model: str, exc: Exception, hint: str = "") -> str:
    """A stream frame's answer when the deployment failed to give one."""
    return orjson.dumps({"error": f"model {model!r} did not answer through Ray Serve ({type(exc).__name__}){hint}",
                         "type": "unavailable"}).decode()  # fmt: skip


class _RaySequence:
    """A stateful model's connection: one sequence, so every frame must reach the one replica that keeps its
    state. Ray Serve pins a call, not a series of calls (a multiplexed id is routed by what replicas reported,
    which lags), so the connection is one streaming call to the deployment, ``sequence``, fed its frames through
    the Mailbox actor: a frame goes in (put), the replica takes it (get), its answer comes back on the stream."""

    def __init__(self, handle: Any, mailbox: Any, model: str, version: int | None):
        _RayFrames._count += 1
        self.key = f"sequence-{os.getpid()}-{_RayFrames._count}"
        self.handle, self.mailbox, self.model, self.version = handle, mailbox, model, version
        self.answers: Any = None

    async def answer(self, request: Any, skipped: int) -> str | bytes:
        try:
            if self.answers is None:
                self.answers = self.handle.options(stream=True, method_name="sequence").remote(self.key, self.version,
                                                                                               self.mailbox)  # fmt: skip
            await self.mailbox.put.remote(self.key, (request, skipped))
            answer: str | bytes = await self.answers.__anext__()
            return answer
        except Exception as exc:  # the replica went away, and the sequence with it: each frame says so
            log.warning("ray: %s: a sequence frame failed: %s", deployment_name(self.model), exc)
            return _unanswered(self.model, exc, "; reconnect to start a new sequence")

    async def end(self) -> None:
        if self.answers is None:
            return
        try:
            await self.mailbox.put.remote(self.key, None)  # the replica's call ends, freeing the sequence
            async for _ in self.answers:
                pass
        except Exception as exc:
            log.warning("ray: %s: ending a sequence failed: %s", deployment_name(self.model), exc)
            self.answers.cancel()
        finally:
            with contextlib.suppress(Exception):
                await self.mailbox.drop.remote(self.key)


class Mailbox:
    """Frames on their way to the replica that holds their connection's sequence (a Ray actor, one per
    server): put by the ingress, got by the replica's ``sequence`` call, by connection key."""

    def __init__(self) -> None:
        self.boxes: dict[str, asyncio.Queue[Any]] = {}

    def _box(self, key: str) -> asyncio.Queue[Any]:
        box = self.boxes.get(key)
        if box is None:
            box = self.boxes[key] = asyncio.Queue()
        return box

    async def put(self, key: str, item: Any) -> None:
        self._box(key).put_nowait(item)

    async def get(self, key: str) -> Any:
        return await self._box(key).get()

    async def drop(self, key: str) -> None:
        self.boxes.pop(key, None)


class _RayChunks:
    """A streamed answer's body after its head, from a deployment's stream. If the client goes away (the
    server's task is cancelled, or it closes this before reading it), the Ray stream is cancelled, so the
    replica stops generating; a deployment that fails midway ends the stream with an error event."""

    def __init__(self, parts: Any, model: str):
        self.parts, self.model, self.done = parts, model, False

    def __aiter__(self) -> _RayChunks:
        return self

    async def __anext__(self) -> bytes:
        if self.done:
            raise StopAsyncIteration
        try:
            return bytes(await self.parts.__anext__())
        except StopAsyncIteration:
            self.done = True
            raise
        except Exception as exc:  # the replica died or was taken down: say so in the stream, then end it
            self.done = True
            log.warning("ray: %s: the stream broke: %s", deployment_name(self.model), exc)
            return b"data: " + orjson.dumps({"error": {"message": f"model {self.model!r} stopped answering through "
                                                       f"Ray Serve ({type(exc).__name__})", "type": "server_error"}}
                                             ) + b"\n\ndata: [DONE]\n\n"  # fmt: skip
        except BaseException:  # cancelled: the client left
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.parts.cancel()


async def _parts(app: Any, message: dict[str, Any], extra: Sequence[tuple[bytes, bytes]] = ()) -> AsyncIterator[Any]:
    """An HTTP request (as the ingress hands it over) through ``app``: {status, headers}, then the body's pieces."""
    from forwardpass.server.http import StreamingResponse

    scope = {"type": "http", "method": message["method"], "path": message["path"], "query_string": message["query"],
             "headers": message["headers"]}  # fmt: skip
    response = await app.dispatch(scope, None, message["body"])
    yield {"status": response.status, "headers": response.asgi_headers() + list(extra)}
    if isinstance(response, StreamingResponse):
        async for chunk in response.chunks:
            yield chunk
    else:
        yield response.body


def applications(config: ServeConfig) -> dict[str, Any]:
    """The Ray Serve applications of a repository, one per model (its deployment, scaled as its model.yaml says),
    by model name."""
    serve = require("ray.serve", "ray", "forwardpass serve --ray")
    assert config.repository is not None
    repository = Repository(config.repository)
    settings = {k: v for k, v in config.model_dump().items() if k not in ("model_control", "load_model")}
    settings["repository"] = str(config.repository)
    settings["workers"] = 1
    bound = {}
    for name in repository.names():
        try:
            scale = repository.config(name).scale
        except ForwardpassError as exc:  # a broken model.yaml: the ingress's app reports it, nothing to deploy
            log.warning("ray: %s is not deployed: %s", name, exc)
            continue
        deployment = serve.deployment(_replica_class(serve), name=deployment_name(name),
                                      ray_actor_options={"num_cpus": 0},  # ONNX Runtime's threads are its own
                                      max_ongoing_requests=max(16, int(scale.target_ongoing_requests * 4)),
                                      autoscaling_config=_autoscaling(scale), health_check_period_s=5)  # fmt: skip
        bound[name] = deployment.bind(settings, name)
    return bound


def _autoscaling(scale: Any) -> dict[str, Any]:
    return {"min_replicas": scale.min_replicas, "initial_replicas": max(1, scale.min_replicas),
            "max_replicas": scale.max_replicas, "target_ongoing_requests": scale.target_ongoing_requests,
            "upscale_delay_s": scale.upscale_delay_s, "downscale_delay_s": scale.downscale_delay_s,
            "metrics_interval_s": 1.0, "look_back_period_s": 3.0}  # fmt: skip


_REPLICA: type | None = None


def _replica_class(serve: Any) -> type:
    """ModelReplica with its session method made Ray Serve's multiplexed loader (once: Ray pickles the class)."""
    global _REPLICA
    if _REPLICA is None:

        class Replica(ModelReplica):
            @serve.multiplexed(max_num_models_per_replica=4096)
            async def remember(self, session: str) -> str:
                return session

        Replica.__qualname__ = Replica.__name__ = "ModelReplica"
        _REPLICA = Replica
    return _REPLICA


# Ray Serve's own hops, which forwardpass does not need: the handle's router on a loop of its own (our server's
# loop routes), and each replica's code on a thread beside its event loop (ours never blocks its loop). Both
# off: 4.2 ms added per request instead of 5.9 (bench/ray_serve.py).
_RAY_SETTINGS = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def run(config: ServeConfig, address: str | None) -> None:
    """Start (or join, with ``address``) a Ray cluster, deploy each model, serve HTTP here until SIGINT or
    SIGTERM (requests in progress drain), then take the deployments down."""
    for name, value in _RAY_SETTINGS.items():  # read when ray.serve is imported, here and in each replica
        os.environ.setdefault(name, value)
    ray = require("ray", "ray", "forwardpass serve --ray")
    serve = require("ray.serve", "ray", "forwardpass serve --ray")
    from forwardpass.server.run import listen, run_loop, worker
    from forwardpass.server.tenancy import prepare_state

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = listen(config.host, config.port)  # taken first: a port in use fails before the cluster starts
    ray.init(address=address or "local", include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                       if k.startswith("FORWARDPASS_") or k in _RAY_SETTINGS}})  # fmt: skip
    prepare_state(config)  # the shared limits reset, usage.sqlite created, before any replica opens them
    serve.start(proxy_location="Disabled")  # this process is the HTTP server: no proxy hop in between
    bound = applications(config)
    mailbox = ray.remote(num_cpus=0, max_concurrency=10000)(Mailbox).remote()  # stateful streams' frames
    handles = serve.run_many([serve.RunTarget(target=b, name=deployment_name(n), route_prefix=None)
                              for n, b in bound.items()]) if bound else []  # fmt: skip
    log.info("ray: deployed %s", ", ".join(deployment_name(n) for n in bound) or "no model")

    async def serve_here() -> None:  # the handles route on this loop: they are taken down on it, before it closes
        try:
            await worker(config, sock, lambda c: RayIngress.create(c, dict(zip(bound, handles)), mailbox))
        finally:
            if address is None:  # the cluster is this process's own
                await serve.shutdown_async()
            else:  # someone else's cluster: only what was deployed here goes

                def delete() -> None:
                    for name in bound:
                        with contextlib.suppress(Exception):
                            serve.delete(deployment_name(name), _blocking=False)

                await asyncio.to_thread(delete)

    run_loop(serve_here())
    ray.shutdown()
