"""forwardpass on Ray Serve, for when one machine is not enough: ``forwardpass serve --ray [--ray-address ADDR]``.

Each model of the repository is a Ray Serve deployment, ``fp-<model>``. Each of its replicas runs the same
``App`` that ``forwardpass serve`` runs (engine, data plane, every route), over a repository in which it
loads that model alone, so a request is answered by exactly the code that answers it on one machine.

One ingress deployment takes every HTTP request from Ray Serve's proxy and finds its model:
- from the path, for V2 and ``:predict``;
- from the JSON body's ``model``, for the OpenAI routes.
It then hands the request (method, path, query, headers, body) to that model's deployment through a
streaming handle, and streams the answer back, server-sent events included. Requests that name no model
(the dashboard page, health, ``/v1/models``) are answered by the ingress itself.

Replicas scale between model.yaml's ``scale.min_replicas`` and ``max_replicas``, on
``target_ongoing_requests``. A language model keeps its continuous batching inside a replica. A request
with an ``x-session-id`` header goes to the replica that served that session before, where its prefix
cache is: Ray Serve's multiplexed-model routing, keyed by the session.

Not carried over here: WebSocket streams (``/v2/models/{m}/stream``) and metrics aggregated across replicas.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson

from forwardpass._deps import require
from forwardpass.errors import ForwardpassError
from forwardpass.repository import Repository
from forwardpass.server.config import ServeConfig

log = logging.getLogger("forwardpass.ray")

_BY_PATH = re.compile(r"/v2/models/(?P<v2>[^/]+)|/v1/models/(?P<v1>[^/:]+)")
_BY_BODY = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/tokenize", "/detokenize"}
_NOT_MODELS = {"stats"}  # /v2/models/stats: every model's statistics, not a model
SESSION = "x-session-id"


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

    def check_health(self) -> None:
        if self._started is not None and self._started.done() and self._started.exception() is not None:
            raise RuntimeError(f"{self.model} did not start: {self._started.exception()}")


class Ingress:
    """Every HTTP request: to its model's deployment, or answered here when it names no model."""

    def __init__(self, settings: dict[str, Any], handles: dict[str, Any]):
        from forwardpass.server.app import create_app

        self.handles = handles
        # no model loaded here: the dashboard's page and files, health, errors in each API's shape
        self.app = create_app(ServeConfig.model_validate({**settings, "model_control": "explicit", "load_model": [],
                                                          "poll_interval": 0}))  # fmt: skip
        self._started: asyncio.Task[None] | None = None
        self.max_body = self.app.config.max_body_bytes

    async def __call__(self, request: Any) -> Any:  # a starlette Request from Ray Serve's proxy
        from starlette.responses import Response

        if self._started is None:
            self._started = asyncio.ensure_future(self.app.engine.start())
        await self._started
        body = await request.body()
        if len(body) > self.max_body:
            return Response(orjson.dumps({"error": f"request body of {len(body)} bytes is over the limit of "
                                          f"{self.max_body} bytes"}), 413, media_type="application/json")  # fmt: skip
        path = request.url.path
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        message = {"method": request.method, "path": path, "query": request.url.query.encode("latin-1"),
                   "headers": headers, "body": body}  # fmt: skip
        if request.method == "GET" and path in _GATHERED:  # a listing of every model: each deployment's own part
            return await self._gather(path, message)
        model, streamed = model_of(path, body)
        handle = self.handles.get(model) if model is not None else None
        if handle is None:  # no model, or one not in the repository: this app's own answer (a 404 names it)
            parts: AsyncIterator[Any] = _parts(self.app, message)
        else:
            session = request.headers.get(SESSION, "")[:200]
            if not streamed:
                whole = await handle.options(multiplexed_model_id=session).remote(message)
                return _starlette(whole, whole["body"])
            parts = handle.options(stream=True, multiplexed_model_id=session, method_name="stream").remote(message)
        start = await parts.__anext__()
        return _starlette(start, _bytes(parts))


    async def _gather(self, path: str, message: dict[str, Any]) -> Any:
        """/ui/api/models and /v1/models over every deployment: each describes its own model (it loads no other)."""
        from starlette.responses import Response

        names = list(self.handles)
        answers = await asyncio.gather(*(self.handles[n].remote(message) for n in names), return_exceptions=True)
        local = [part async for part in _parts(self.app, message)]
        if path == "/metrics":  # each deployment's (one replica's) metrics, one exposition
            texts = [a["body"] for a in answers if isinstance(a, dict) and a["status"] == 200]
            return Response(merge_metrics([local[1], *texts]), media_type="text/plain; version=0.0.4; charset=utf-8")
        doc = orjson.loads(local[1])
        if path == "/v1/models":
            listed = [m for a in answers if isinstance(a, dict) and a["status"] == 200
                      for m in orjson.loads(a["body"])["data"]]  # fmt: skip
            doc["data"] = sorted({m["id"]: m for m in listed}.values(), key=lambda m: m["id"])
        else:
            own = {}
            for name, answer in zip(names, answers):
                if isinstance(answer, dict) and answer["status"] == 200:
                    own.update({m["name"]: m for m in orjson.loads(answer["body"])["models"] if m["name"] == name})
            doc["models"] = [own.get(m["name"], m) for m in doc["models"]]
        return Response(orjson.dumps(doc), media_type="application/json")


_GATHERED = {"/ui/api/models", "/v1/models", "/metrics"}


def merge_metrics(texts: list[bytes]) -> bytes:
    """Prometheus expositions of several processes as one: samples with the same labels are summed (counts
    and gauges of the process, such as requests in flight), others kept side by side (each model's own)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    sums: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                sums[key] = sums.get(key, 0.0) + sample.value
    for (family_name, sample_name, labels), value in sums.items():
        families[family_name].add_sample(sample_name, dict(labels), value)

    class Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return bytes(generate_latest(registry))


def _starlette(head: dict[str, Any], body: Any) -> Any:
    """A starlette response (what Ray Serve's proxy sends) of a head and a body: bytes, or chunks to stream."""
    from starlette.responses import Response, StreamingResponse

    raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head["headers"]]
    kind = next((v for k, v in raw if k == "content-type"), "application/octet-stream")
    kept = {k: v for k, v in raw if k not in ("content-type", "content-length")}
    if isinstance(body, bytes):
        return Response(body, status_code=head["status"], headers=kept, media_type=kind)
    return StreamingResponse(body, status_code=head["status"], headers=kept, media_type=kind)


async def _bytes(parts: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    async for part in parts:
        yield part


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


def application(config: ServeConfig) -> Any:
    """The Ray Serve application of a repository: one deployment per model, scaled as its model.yaml says."""
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
    ingress = serve.deployment(Ingress, name="fp-ingress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=1024)  # fmt: skip
    return ingress.bind(settings, bound)


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


def run(config: ServeConfig, address: str | None) -> None:
    """Start (or join, with ``address``) a Ray cluster, deploy the repository, serve until SIGINT or SIGTERM."""
    ray = require("ray", "ray", "forwardpass serve --ray")
    serve = require("ray.serve", "ray", "forwardpass serve --ray")
    ray.init(address=address, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("FORWARDPASS_")}})  # fmt: skip
    from forwardpass.server.tenancy import prepare_state

    prepare_state(config)  # the shared limits reset, usage.sqlite created, before any replica opens them
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(application(config), name="forwardpass", route_prefix="/")
    log.info("forwardpass on Ray Serve at http://%s:%d/", config.host, config.port)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    serve.shutdown()
    ray.shutdown()


