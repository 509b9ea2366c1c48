"""forwardpass's own HTTP/1.1 server: an asyncio Protocol on httptools' parser, calling App.dispatch.

uvicorn spends about 70 us of a 2-core machine's CPU per request before the application runs
(bench/serve.py measures 13k requests/s for an empty ASGI app against 110k for this protocol);
for a model whose forward pass costs 12 us that is most of the bill. This protocol does what a
model server needs and nothing else: keep-alive, pipelined requests answered in order,
``Expect: 100-continue``, body and header limits checked while reading, an idle timeout,
back-pressure, and a drain on shutdown. One write per response.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any
from urllib.parse import unquote

import httptools

from forwardpass.errors import PayloadTooLarge
from forwardpass.server.app import App
from forwardpass.server.errors import error_response
from forwardpass.server.http import Response, StreamingResponse

log = logging.getLogger("forwardpass.server")

MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 32  # complete requests waiting on one connection before it stops reading
KEEP_ALIVE_TIMEOUT = 5.0  # seconds an idle connection stays open


class ServerState:
    """What the protocol instances share: the app, open connections, requests in progress."""

    def __init__(self, app: App, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.connections: set[HttpProtocol] = set()
        self.active = 0  # connections with a request being handled
        self.idle = asyncio.Event()  # set when active drops to 0
        self.idle.set()
        self.closing = False
        self._sweeper: asyncio.TimerHandle | None = None

    def start_sweeping(self) -> None:
        """Close keep-alive connections idle for KEEP_ALIVE_TIMEOUT: one timer for the server, not one per request."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for connection in list(self.connections):
            if not connection.busy and not connection.queue and now - connection.last_active > KEEP_ALIVE_TIMEOUT:
                connection.close_if_idle()
        self._sweeper = loop.call_later(1.0, self.start_sweeping)

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, state: ServerState):
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[tuple[dict[str, Any], bytes | None, Response | None, bool]] = deque()
        self.busy = False
        self.task: asyncio.Task[None] | None = None
        self.streaming = False  # a streamed response is being written: a lost client cancels self.task
        self.reading = True
        self.write_paused = False
        self.drained = asyncio.Event()
        self.drained.set()
        self.last_active = self.loop.time()
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.error: Response | None = None

    # -- connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        self.queue.clear()
        self.transport = None
        self.drained.set()
        if self.streaming and self.task is not None:
            self.task.cancel()  # stops the producer (a generation frees its slot)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.drained.clear()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.drained.set()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fatal(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fatal(400, f"malformed HTTP request: {exc}")

    def _fatal(self, status: int, message: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(Response.json({"error": message}, status).encode(keep_alive=False))
            self.transport.close()

    def close_if_idle(self) -> None:
        """On shutdown: close now unless a request is in progress."""
        if self.transport is not None and not self.busy and not self.queue:
            self.transport.close()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            if self.error is None:  # keep parsing (the parser needs to), but keep nothing more
                self.error = Response.json({"error": "request headers are larger than 64 KiB"}, 431)
            return
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit() and int(value) > self.state.max_body_bytes:
                self.error = error_response(PayloadTooLarge(
                    f"request body of {int(value)} bytes is over the limit of {self.state.max_body_bytes} bytes"))
            elif name == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
                if self.error is None:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.error is not None:
            return  # a body we will refuse: do not keep it
        self.body_size += len(body)
        if self.body_size > self.state.max_body_bytes:
            self.error = error_response(PayloadTooLarge(
                f"request body is over the limit of {self.state.max_body_bytes} bytes"))
            self.body = []
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        parsed = httptools.parse_url(self.url)
        path = parsed.path.decode("latin-1")
        scope = {
            "method": self.parser.get_method().decode("ascii"),
            "path": unquote(path) if "%" in path else path,  # as ASGI servers give it
            "query_string": parsed.query or b"",
            "headers": self.headers,
        }
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        keep_alive = self.parser.should_keep_alive() and not self.state.closing
        self.queue.append((scope, body, self.error, keep_alive))
        if len(self.queue) > MAX_PIPELINED and self.reading and self.transport is not None:
            self.transport.pause_reading()
            self.reading = False
        if not self.busy:
            self.busy = True
            self.state.active += 1
            self.state.idle.clear()
            self.task = self.loop.create_task(self._serve_queue())

    # -- answering -----------------------------------------------------------------------------

    async def _stream(self, response: StreamingResponse, keep_alive: bool) -> None:
        """Write a streamed response as HTTP/1.1 chunks, one write per chunk, waiting when the client is slow."""
        assert self.transport is not None
        self.streaming = True
        self.transport.write(response.head(keep_alive))
        try:
            async for chunk in response.chunks:
                if self.write_paused:
                    await self.drained.wait()
                if self.transport is None:
                    return
                if chunk:
                    self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            if self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
        finally:
            self.streaming = False
            aclose = getattr(response.chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _serve_queue(self) -> None:
        """Answer queued requests one at a time, in order (HTTP/1.1 pipelining)."""
        try:
            while self.queue and self.transport is not None:
                scope, body, error, keep_alive = self.queue.popleft()
                response = error or await self.state.app.dispatch(scope, None, body)
                if self.transport is None:
                    return
                if self.write_paused:
                    await self.drained.wait()
                    if self.transport is None:
                        return
                keep_alive = keep_alive and not self.state.closing and error is None
                if isinstance(response, StreamingResponse):
                    await self._stream(response, keep_alive)
                    if self.transport is None:
                        return
                else:
                    self.transport.write(response.encode(keep_alive, head=scope["method"] == "HEAD"))
                if not keep_alive:
                    self.transport.close()
                    return
                if not self.reading and len(self.queue) <= MAX_PIPELINED // 2:
                    self.transport.resume_reading()
                    self.reading = True
        except asyncio.CancelledError:
            pass  # the client left during a streamed response
        except Exception:  # dispatch never raises; this guards the protocol's own code
            log.exception("connection handler failed")
            if self.transport is not None:
                self.transport.close()
        finally:
            self.busy = self.streaming = False
            self.state.active -= 1
            if self.state.active == 0:
                self.state.idle.set()
            self.last_active = self.loop.time()
