"""Assembly: engine + handlers + routes as one ASGI application, with lifespan start/stop.

    app = create_app(ServeConfig(repository="models"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from forwardpass.engine import Engine
from forwardpass.errors import ForwardpassError, ModelNotFound
from forwardpass.repository import Repository
from forwardpass.server import stream
from forwardpass.server.auth import Access, Keys
from forwardpass.server.config import ServeConfig
from forwardpass.server.errors import error_response
from forwardpass.server.handlers import Handlers
from forwardpass.server.http import AsgiWriter, Request, Response, StreamingResponse, deliver
from forwardpass.server.openai import OpenAIHandlers
from forwardpass.server.openai_extras import OpenAIExtras
from forwardpass.server.responses import ResponsesHandlers
from forwardpass.server.routes import routes
from forwardpass.server.tenancy import state_dir, tenancy_from_config

log = logging.getLogger("forwardpass.server")
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class App:
    """The ASGI callable: routes HTTP requests, runs the engine's start/stop on lifespan events."""

    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine, self.config = engine, config
        self.tenancy = tenancy_from_config(config)
        self.keys = Keys.from_config(config, self.tenancy)
        self.handlers = Handlers(engine, config, self.tenancy)
        self._publishing: asyncio.Task[None] | None = None
        self.router = routes(self.handlers, OpenAIHandlers(engine, config, self.tenancy),
                             OpenAIExtras(engine, config, self.tenancy), ResponsesHandlers(engine, config, self.tenancy),
                             self.keys, self.tenancy.usage)  # fmt: skip

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        response = await self.dispatch(scope, receive, None)
        writer = AsgiWriter(send)
        if not isinstance(response, StreamingResponse):
            await writer.whole(response)
            return
        # streamed: a disconnect (seen by receive()) cancels the sending task, which stops the producer
        sending = asyncio.ensure_future(deliver(response, writer))

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            sending.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await sending
        except asyncio.CancelledError:
            if not sending.cancelled():
                raise
        finally:
            watcher.cancel()

    async def _websocket(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """A WebSocket stream (server/stream.py) from an ASGI server: checked, then accepted, then served."""
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            model, version, drop = self.accept_stream(scope)
        except ForwardpassError as exc:
            await send({"type": "websocket.close", "code": stream.POLICY, "reason": stream._reason(exc.message)})
            return
        await send({"type": "websocket.accept", "subprotocol": stream.subprotocol(scope.get("subprotocols", []))})
        await stream.serve_frames(self.frames(model, version), _AsgiChannel(receive, send), drop,
                                  self.config.max_elements)  # fmt: skip

    def accept_stream(self, scope: dict[str, Any]) -> tuple[str, int | None, str]:
        """(model, version, drop policy) for a stream request, after the key check and the model lookup;
        a ForwardpassError says why not (the connection is then refused)."""
        found = stream.match(scope["path"])
        if found is None:
            raise ModelNotFound(f"{scope['path']}: no such stream endpoint; streams are at /v2/models/{{model}}/stream")
        self.keys.check(Request(scope, None, {}), Access.INFER)
        drop = stream.drop_policy(scope.get("query_string", b""))
        self.check_streamable(*found)
        return found[0], found[1], drop

    def check_streamable(self, model: str, version: int | None) -> None:
        """An unknown, unready or language model is refused a stream before it is accepted."""
        self.engine.served(model, version)

    def frames(self, model: str, version: int | None) -> stream.Frames:
        """Who answers an accepted stream's frames: this process's engine (Ray's ingress: the model's deployment)."""
        return stream.EngineFrames(self.engine, model, version)

    async def dispatch(self, scope: dict[str, Any], receive: Receive | None,
                       body: bytes | None) -> Response | StreamingResponse:  # fmt: skip
        """Route one request (``scope`` needs method, path and headers) and answer it; never raises."""
        method, path = scope["method"], scope["path"]
        handler, params, path_exists, on_error = self.router.match(method, path)
        stats = self.engine.stats
        stats.inflight += 1
        try:
            if handler is None:
                answer = self.router.unmatched(method, path, path_exists)  # an API's own shape (OpenAI's under /v1/)
                if answer is not None:
                    return answer
                status = 405 if path_exists else 404
                return Response.json({"error": f"{method} {path}: "
                                      + ("method not allowed" if path_exists else "no such endpoint")}, status)  # fmt: skip
            request = Request(scope, receive, params, body)
            try:
                response = await handler(request, **params)
            except Exception as exc:  # every error becomes a response, in the route's shape; the server keeps serving
                response = (on_error or error_response)(exc, self.engine.stats)
            return response if request.charge is None else self.tenancy.finish(request, response)
        except Exception as exc:
            return (on_error or error_response)(exc, self.engine.stats)
        finally:
            stats.inflight -= 1

    def start_publishing(self) -> None:
        """With several workers: this one's statistics published for the others' /metrics (server/metrics.py)."""
        peers = self.handlers.peers
        if peers is not None and self._publishing is None:
            self._publishing = asyncio.ensure_future(peers.run(self.engine.stats))

    async def stop_publishing(self) -> None:
        if self._publishing is not None:
            self._publishing.cancel()
            await asyncio.gather(self._publishing, return_exceptions=True)
            self._publishing = None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.engine.start()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self.start_publishing()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop_publishing()
                await self.engine.stop(self.config.drain_timeout)
                await asyncio.to_thread(self.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def close(self) -> None:
        """After the engine stopped: usage written out (blocking: a thread's work)."""
        self.tenancy.close()


def create_app(config: ServeConfig | None = None) -> App:
    """The ASGI app for a repository (the demo repository when config.repository is None)."""
    from forwardpass import default_repository

    config = config or ServeConfig.from_env()
    repository = Repository(config.repository or default_repository())
    engine = Engine(repository, cache_bytes=config.cache_bytes, poll_interval=config.poll_interval,
                    model_control=config.model_control, load_models=config.load_model,
                    drain_timeout=config.drain_timeout, state_dir=state_dir(config))  # fmt: skip
    return App(engine, config)


def create_app_from_env() -> App:
    """Factory for `uvicorn --factory` worker processes: settings come from FORWARDPASS_* variables."""
    return create_app(ServeConfig.from_env())


class _AsgiChannel:
    """server/stream.py's Channel over ASGI's websocket messages."""

    def __init__(self, receive: Receive, send: Send):
        self._receive, self._send, self._closed = receive, send, False

    async def receive(self) -> str | bytes | None:
        message = await self._receive()
        if message["type"] != "websocket.receive":
            self._closed = True
            return None
        return message.get("text") if message.get("text") is not None else message.get("bytes", b"")

    async def send(self, message: str | bytes) -> None:
        if not self._closed:
            key = "text" if isinstance(message, str) else "bytes"
            await self._send({"type": "websocket.send", key: message})

    async def close(self, code: int, reason: str) -> None:
        if not self._closed:
            self._closed = True
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
