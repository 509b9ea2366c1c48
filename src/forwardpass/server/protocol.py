"""forwardpass's own HTTP/1.1 server: an asyncio Protocol on httptools' parser, calling App.dispatch.

uvicorn spends about 70 us of a 2-core machine's CPU per request before the application runs
(bench/serve.py measures 13k requests/s for an empty ASGI app against 110k for this protocol);
for a model whose forward pass costs 12 us that is most of the bill. This protocol does what a
model server needs and nothing else: keep-alive, pipelined requests answered in order,
``Expect: 100-continue``, body and header limits checked while reading, back-pressure, and a
drain on shutdown. One write per response.

Time limits (ServeConfig): a connection with no request in progress closes after
``keep_alive_timeout``; a request that has begun must arrive within ``body_timeout`` plus one
second per ``body_min_rate`` bytes received (so a slow but steady upload finishes, a trickle is
answered 408). A request refused while it is arriving (413 for a body over the limit, 431, 414,
400 for malformed HTTP or HTTP/0.9, 408) is answered at once, in order after the requests before
it. Every close after an answer is a lingering one: the server half-closes, then reads and drops
what the client still sends for up to ``linger_timeout``, so that a client busy sending its body
reads the answer instead of a connection reset.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

import httptools

from forwardpass.errors import ForwardpassError, HttpProtocolError, PayloadTooLarge
from forwardpass.server import stream
from forwardpass.server.app import App
from forwardpass.server.errors import INTERNAL_ERROR, error_response
from forwardpass.server.http import ClientGone, Response, StreamingResponse, deliver

log = logging.getLogger("forwardpass.server")

MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 32  # complete requests waiting on one connection before it stops reading


def _refusal(status: int, kind: str, message: str) -> Response:
    return error_response(HttpProtocolError(status, kind, message))


def _http_0_9_refusal() -> Response:
    return _refusal(400, "bad_request", "HTTP/0.9 requests are not supported; send an HTTP/1.1 request line "
                    "such as 'GET /v2/health/live HTTP/1.1'")  # fmt: skip


class ServerState:
    """What the protocol instances share: the app, its limits, open connections, requests in progress."""

    def __init__(self, app: App):
        config = app.config
        self.app = app
        self.max_body_bytes = config.max_body_bytes
        self.keep_alive_timeout = config.keep_alive_timeout
        self.body_timeout = config.body_timeout
        self.body_min_rate = config.body_min_rate
        self.linger_timeout = config.linger_timeout
        self.connections: set[HttpProtocol] = set()
        self.max_elements = config.max_elements
        self.streams = 0  # WebSocket streams being served (they do not hold a shutdown's drain)
        self.active = 0  # connections with a request being handled
        self.idle = asyncio.Event()  # set when active drops to 0
        self.idle.set()
        self.closing = False
        self._sweeper: asyncio.TimerHandle | None = None

    def start_sweeping(self) -> None:
        """Apply the time limits: one timer for the server, not one per request."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for connection in list(self.connections):
            connection.expire(now)
        every = min(1.0, self.keep_alive_timeout / 4, self.body_timeout / 4)
        self._sweeper = loop.call_later(max(every, 0.05), self.start_sweeping)

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
        # (scope, body, response, keep_alive): a request to dispatch, or (None, None, refusal, False)
        self.queue: deque[tuple[dict[str, Any] | None, bytes | None, Response | None, bool]] = deque()
        self.busy = False
        self.task: asyncio.Task[None] | None = None
        self.streaming = False  # a streamed response is being written: a lost client cancels self.task
        self.reading = True
        self.write_paused = False
        self.drained = asyncio.Event()
        self.drained.set()
        self.last_active = self.loop.time()
        self.in_request = False  # a request has begun arriving and is not complete yet
        self.began = 0.0  # when that request was first seen incomplete (its arrival clock)
        self.refused = False  # a refusal is queued: what the client sends from now on is dropped unparsed
        self.client_eof = False  # the client half-closed: answer what it sent, then close
        self.continue_due = False  # "100 Continue" owed once the requests before this one are answered
        self._linger: asyncio.TimerHandle | None = None
        self.upgrade: dict[str, Any] | None = None  # a request asking to switch protocols (a WebSocket stream)
        self.websocket: WebSocketChannel | None = None  # this connection, once upgraded
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_size = 0

    # -- connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        self.queue.clear()
        self._reset()  # the parser and this protocol refer to each other: free the buffers now, not at gc
        self.transport = None
        self.drained.set()
        if self._linger is not None:
            self._linger.cancel()
        if self.streaming and self.task is not None:
            self.task.cancel()  # stops the producer (a generation frees its slot)
        if self.websocket is not None:
            self.websocket.lost()

    def eof_received(self) -> bool:
        if self.busy or self.queue:  # answer what came before the half-close
            self.client_eof = True
            return True
        return False  # the transport closes

    def pause_writing(self) -> None:
        self.write_paused = True
        self.drained.clear()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.drained.set()

    def data_received(self, data: bytes) -> None:
        if self.websocket is not None:
            self.websocket.feed(data)
            return
        if self.refused:
            return  # lingering after a refusal: read and drop
        fresh = not self.in_request  # a request starts at the beginning of ``data``
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0]:] if exc.args and isinstance(exc.args[0], int) else b"")
        except httptools.HttpParserError as exc:
            if not self.refused:
                self._refuse(_refusal(400, "bad_request", f"malformed HTTP request: {exc}"))
        else:
            if self.in_request and not self.refused:  # incomplete: the slow path (complete requests skip it)
                if fresh:
                    self.began = self.loop.time()
                    if _http_0_9(data):  # an HTTP/0.9 line waits for headers that will never come
                        self._refuse(_http_0_9_refusal())

    def expire(self, now: float) -> None:
        """The sweeper's check: close an idle keep-alive connection, answer 408 to a request arriving too slowly."""
        if self.transport is None or self.refused or self.busy or self.queue or self.websocket is not None:
            return
        if not self.in_request:
            if now - self.last_active > self.state.keep_alive_timeout:
                self.transport.close()
            return
        received, elapsed = self.header_bytes + self.body_size, now - self.began
        if elapsed > self.state.body_timeout + received / self.state.body_min_rate:
            self._refuse(_refusal(408, "request_timeout", (
                f"the request did not arrive in time: {received} bytes in {elapsed:.1f} s; a request may take "
                f"{self.state.body_timeout:g} s plus 1 s per {self.state.body_min_rate} bytes received; send it "
                "faster, or raise FORWARDPASS_BODY_TIMEOUT or lower FORWARDPASS_BODY_MIN_RATE")))  # fmt: skip

    def close_if_idle(self) -> None:
        """On shutdown: close now unless a request is in progress (a WebSocket stream is told 1001, going away)."""
        if self.websocket is not None:
            self.loop.create_task(self.websocket.close(1001, "the server is shutting down"))
        elif self.transport is not None and not self.busy and not self.queue:
            self.transport.close()

    def _refuse(self, response: Response) -> None:
        """Answer ``response`` after the requests already queued, then close; drop whatever comes meanwhile."""
        self.refused = True
        self.continue_due = False
        self._reset()
        self.queue.append((None, None, response, False))
        self._start_serving()

    def _close(self) -> None:
        """Close after the last answer: half-close, then read and drop for up to linger_timeout.

        Closing a socket with unread data makes the kernel send a reset, and a client still sending
        its body (httpx, requests) then loses the answer that already arrived.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or self._linger is not None:
            return
        self.refused = True
        self.continue_due = False
        if self.client_eof or self.state.linger_timeout <= 0 or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if not self.reading:
            transport.resume_reading()
            self.reading = True
        self._linger = self.loop.call_later(self.state.linger_timeout, transport.abort)

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self.in_request = True

    def on_url(self, url: bytes) -> None:
        if self.refused:
            return
        self.url += url
        self.header_bytes += len(url)
        if self.header_bytes > MAX_HEADER_BYTES:
            self._refuse(_refusal(414, "uri_too_long", "the request's URL is longer than 64 KiB"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.refused:
            return
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            self._refuse(_refusal(431, "headers_too_large", "request headers are larger than 64 KiB"))
            return
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.refused:
            return
        if not self.parser.should_keep_alive() and self.parser.get_http_version() == "0.9":  # 1.1 skips the 2nd call
            self._refuse(_http_0_9_refusal())
            return
        expect = False
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit() and int(value) > self.state.max_body_bytes:
                self._refuse(error_response(PayloadTooLarge(
                    f"request body of {int(value)} bytes is over the limit of {self.state.max_body_bytes} bytes; "
                    "send a smaller body or raise FORWARDPASS_MAX_BODY_BYTES")))  # fmt: skip
                return
            if name == b"expect" and value.lower() == b"100-continue":
                expect = True
        if expect:
            self.continue_due = True
            self._send_continue()

    def on_body(self, body: bytes) -> None:
        if self.refused:
            return  # a body we refused: do not keep it
        self.body_size += len(body)
        if self.body_size > self.state.max_body_bytes:
            self._refuse(error_response(PayloadTooLarge(
                f"request body is over the limit of {self.state.max_body_bytes} bytes; send a smaller body or "
                "raise FORWARDPASS_MAX_BODY_BYTES")))  # fmt: skip
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        parsed = httptools.parse_url(self.url)
        if self.parser.should_upgrade():  # answered by _upgrade, once the parser hands over the connection
            self.upgrade = {"type": "websocket", "path": unquote(parsed.path.decode("latin-1")),
                            "query_string": parsed.query or b"", "headers": self.headers, "url": self.url}  # fmt: skip
            self.in_request = False
            return
        path = parsed.path.decode("latin-1")
        scope = {
            "method": self.parser.get_method().decode("ascii"),
            "path": unquote(path) if "%" in path else path,  # as ASGI servers give it
            "query_string": parsed.query or b"",
            "headers": self.headers,
        }
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []  # the chunks go now; the joined body goes with the request
        self.in_request = self.continue_due = False
        keep_alive = self.parser.should_keep_alive() and not self.state.closing
        self.queue.append((scope, body, None, keep_alive))
        if len(self.queue) > MAX_PIPELINED and self.reading and self.transport is not None:
            self.transport.pause_reading()
            self.reading = False
        if not self.busy:
            self._start_serving()

    # -- WebSocket streams (server/stream.py) ---------------------------------------------------

    def _upgrade(self, rest: bytes) -> None:
        """Switch this connection to a WebSocket stream, or refuse the upgrade with an HTTP answer."""
        scope, self.upgrade = self.upgrade, None
        wants = scope is not None and any(n == b"upgrade" and v.lower() == b"websocket" for n, v in scope["headers"])
        if scope is None or not wants or self.busy or self.queue:
            self._refuse(_refusal(400, "bad_request", "protocol upgrades are supported only to a WebSocket stream "
                                  "(GET /v2/models/{model}/stream with Upgrade: websocket), one request at a time"))
            return
        try:
            model, version, drop = self.state.app.accept_stream(scope)
        except ForwardpassError as exc:
            self._refuse(error_response(exc))
            return
        from websockets.http11 import Request as Handshake
        from websockets.server import ServerProtocol
        from websockets.typing import Subprotocol

        def select(_: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
            chosen = stream.subprotocol(offered)
            return None if chosen is None else Subprotocol(chosen)

        ws = ServerProtocol(max_size=self.state.max_body_bytes, select_subprotocol=select)
        # websockets parses the handshake itself: the request as it came (httptools has read it already)
        ws.receive_data(b"GET " + scope["url"] + b" HTTP/1.1\r\n"
                        + b"".join(n + b": " + v + b"\r\n" for n, v in scope["headers"]) + b"\r\n")  # fmt: skip
        (handshake,) = ws.events_received()
        assert isinstance(handshake, Handshake)
        response = ws.accept(handshake)
        ws.send_response(response)
        assert self.transport is not None
        self.transport.write(b"".join(ws.data_to_send()))
        if response.status_code != 101:  # a malformed handshake: websockets said why in its answer
            self._close()
            return
        channel = self.websocket = WebSocketChannel(self, ws)
        if rest:
            channel.feed(rest)
        self.state.streams += 1
        self.task = self.loop.create_task(self._serve_stream(channel, model, version, drop))

    async def _serve_stream(self, channel: WebSocketChannel, model: str, version: int | None, drop: str) -> None:
        try:
            frames = self.state.app.frames(model, version)
            await stream.serve_frames(frames, channel, drop, self.state.max_elements)
        finally:
            self.state.streams -= 1
            await channel.close(1000, "")

    # -- answering -----------------------------------------------------------------------------

    def _start_serving(self) -> None:
        if not self.busy:
            self.busy = True
            self.state.active += 1
            self.state.idle.clear()
            self.task = self.loop.create_task(self._serve_queue())

    def _send_continue(self) -> None:
        """'100 Continue' for the request arriving, once no answer to an earlier request is still to come."""
        if self.continue_due and not self.busy and not self.queue and self.transport is not None:
            self.continue_due = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _serve_queue(self) -> None:
        """Answer queued requests one at a time, in order (HTTP/1.1 pipelining)."""
        try:
            while self.queue and self.transport is not None:
                scope, body, refusal, keep_alive = self.queue.popleft()
                response: Response | StreamingResponse | None = refusal
                if response is None:
                    try:
                        response = await self.state.app.dispatch(scope or {}, None, body)
                    except Exception:  # dispatch never raises; if it does, the client still gets an answer
                        log.exception("request handler failed")
                        response = INTERNAL_ERROR
                body = None  # a large body is freed before the answer is written
                if self.transport is None:
                    await _discard(response)
                    return
                if self.write_paused:
                    await self.drained.wait()
                    if self.transport is None:
                        await _discard(response)
                        return
                keep_alive = keep_alive and not self.state.closing and not self.client_eof
                writer = Http11Writer(self, keep_alive, head=scope is not None and scope["method"] == "HEAD")
                await deliver(response, writer)
                if self.transport is None:
                    return
                if not writer.keep_alive:
                    self._close()
                    return
                if not self.reading and len(self.queue) <= MAX_PIPELINED // 2:
                    self.transport.resume_reading()
                    self.reading = True
        except asyncio.CancelledError:
            pass  # the client left during a streamed response
        except Exception:  # this guards the protocol's own code
            log.exception("connection handler failed")
            if self.transport is not None:
                self.transport.close()
        finally:
            self.busy = self.streaming = False
            self.state.active -= 1
            if self.state.active == 0:
                self.state.idle.set()
            self.last_active = self.loop.time()
            if self.in_request:
                self.began = self.last_active  # a request arriving behind others: its clock starts now
            if self.client_eof and not self.queue:
                self._close()
            if self.continue_due:
                self._send_continue()


async def _discard(response: Response | StreamingResponse) -> None:
    """An answer never sent (the client left while it was made): a streamed one's producer is closed, so that
    it stops (a generation frees its slot, a Ray stream is cancelled)."""
    close = getattr(response.chunks, "aclose", None) if isinstance(response, StreamingResponse) else None
    if close is not None:
        try:
            await close()
        except Exception:
            log.exception("closing an answer nobody reads failed")


def _http_0_9(data: bytes) -> bool:
    """Whether ``data``, the start of a request, is a request line without an HTTP version (HTTP/0.9).

    httptools reads such a line as HTTP/0.9 and waits for headers that an HTTP/0.9 client never
    sends; a line followed by headers is caught in on_headers_complete instead.
    """
    line = data.lstrip(b"\r\n")  # empty lines before a request are allowed
    end = line.find(b"\n")
    if end == -1 or line.find(b" HTTP/", 0, end) != -1:
        return False
    return line[:end].rstrip(b"\r").count(b" ") == 1  # METHOD /path; anything else is the parser's to refuse


class Http11Writer:
    """server/http.py's Writer for one of our HTTP/1.1 connections: a whole answer in one write (status
    line, headers and body), a streamed one in chunked encoding, one write per chunk, waiting while the
    client is slow to read."""

    __slots__ = ("connection", "keep_alive", "head")

    def __init__(self, connection: HttpProtocol, keep_alive: bool, head: bool = False):
        self.connection, self.keep_alive, self.head = connection, keep_alive, head

    async def whole(self, response: Response) -> None:
        try:
            data = response.encode(self.keep_alive, head=self.head)
        except Exception:
            log.exception("response could not be encoded")
            data, self.keep_alive = INTERNAL_ERROR.encode(False), False
        self._transport().write(data)

    async def open(self, response: StreamingResponse) -> None:
        self.connection.streaming = True
        self._transport().write(response.head(self.keep_alive))

    async def chunk(self, data: bytes) -> None:
        if self.connection.write_paused:
            await self.connection.drained.wait()
        self._transport().write(b"%x\r\n%b\r\n" % (len(data), data))

    async def end(self) -> None:
        self.connection.streaming = False
        self._transport().write(b"0\r\n\r\n")

    def _transport(self) -> asyncio.Transport:
        transport = self.connection.transport
        if transport is None:
            raise ClientGone
        return transport


class Listener:
    """Our own HTTP/1.1 server for an App on a bound socket: what a ``forwardpass serve`` worker runs.

        listener = Listener(app)          # before the engine starts: its batchers count our requests
        await app.engine.start()
        await listener.serve(sock)
        ...
        await listener.drain(timeout)     # no new connections; requests in progress finish
        await app.engine.stop(timeout)
        listener.close()                  # the connections still open
    """

    def __init__(self, app: App):
        self.state = ServerState(app)
        app.engine.count_pending(lambda: self.state.active)
        self._server: asyncio.Server | None = None

    async def serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: HttpProtocol(self.state), sock=sock, backlog=2048)
        self.state.start_sweeping()

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, close idle connections, wait up to ``timeout`` for requests in progress; False if
        some were still running."""
        state = self.state
        state.closing = True
        state.stop_sweeping()
        if self._server is not None:
            self._server.close()
        for connection in list(state.connections):
            connection.close_if_idle()
        try:
            await asyncio.wait_for(state.idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        for connection in list(self.state.connections):
            if connection.transport is not None:
                connection.transport.close()


class WebSocketChannel:
    """server/stream.py's Channel over one of our connections, with websockets' sans-I/O protocol doing the
    framing (masking, fragments, ping/pong, the close handshake). Reading pauses while messages wait."""

    PAUSE_AT = 4  # messages received and not yet taken: the socket stops being read

    def __init__(self, connection: HttpProtocol, ws: Any):
        self.connection, self.ws = connection, ws
        self.messages: deque[str | bytes | None] = deque()
        self.arrived = asyncio.Event()
        self._parts: list[bytes] = []
        self._text = False
        self.closed = False

    def feed(self, data: bytes) -> None:
        from websockets.frames import Opcode

        self.ws.receive_data(data)
        for frame in self.ws.events_received():
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                self._text, self._parts = frame.opcode is Opcode.TEXT, [frame.data]
            elif frame.opcode is Opcode.CONT:
                self._parts.append(frame.data)
            else:
                continue  # ping (answered by the protocol), pong, close (handled below)
            if frame.fin:
                data_ = b"".join(self._parts)
                self._parts = []
                self.messages.append(data_.decode("utf-8", "replace") if self._text else data_)
                self.arrived.set()
        self._flush()
        if self.ws.close_expected() or self.ws.state.name == "CLOSED":
            self.lost()
        elif len(self.messages) >= self.PAUSE_AT and self.connection.reading and self.connection.transport is not None:
            self.connection.transport.pause_reading()
            self.connection.reading = False

    def lost(self) -> None:
        if not self.closed:
            self.closed = True
            self.messages.append(None)
            self.arrived.set()

    async def receive(self) -> str | bytes | None:
        while not self.messages:
            self.arrived.clear()
            await self.arrived.wait()
        message = self.messages.popleft()
        connection = self.connection
        if not connection.reading and len(self.messages) < self.PAUSE_AT // 2 and connection.transport is not None:
            connection.transport.resume_reading()
            connection.reading = True
        if message is None:
            self.messages.append(None)  # every later receive() sees the end too
        return message

    async def send(self, message: str | bytes) -> None:
        if self.closed or self.connection.transport is None:
            return
        if isinstance(message, str):
            self.ws.send_text(message.encode())
        else:
            self.ws.send_binary(message)
        if self.connection.write_paused:
            await self.connection.drained.wait()
        self._flush()

    async def close(self, code: int, reason: str) -> None:
        transport = self.connection.transport
        if transport is None:
            return
        if not self.closed and self.ws.state.name == "OPEN":
            self.ws.send_close(code, reason)
            self._flush()
        self.closed = True
        transport.close()

    def _flush(self) -> None:
        transport = self.connection.transport
        if transport is None:
            return
        for data in self.ws.data_to_send():
            if data:
                transport.write(data)
