"""A small ASGI layer: requests, responses and a route table; no framework on the hot path.

Starlette's request/response objects and FastAPI's dependency machinery cost 200+ us per
request on a 2-core machine, more than a small model's forward pass (see issue 4's facts and
bench/serve.py), so the few things a V2 server needs are written here directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qsl

import orjson

from forwardpass.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType, shown

log = logging.getLogger("forwardpass.server")


class Request:
    """An HTTP request: method, path, headers (lower-case names) and body.

    From ASGI, ``receive`` delivers the body; from forwardpass's own HTTP protocol the body is
    complete before the handler runs (``body`` given, ``receive`` None). ``read_body`` undoes a
    gzip or deflate ``Content-Encoding`` in both cases.
    """

    __slots__ = ("scope", "receive", "params", "body", "charge", "_headers", "_complete", "_read")

    def __init__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]] | None,
        params: dict[str, str],
        body: bytes | None = None,
    ):
        self.scope, self.receive, self.params = scope, receive, params
        self.body = body or b""
        self.charge: Any = None  # the caller's usage and limits (server/tenancy.py), set by the key check
        self._complete = body is not None
        self._read = False
        self._headers: dict[str, str] | None = None

    @property
    def method(self) -> str:
        return self.scope["method"]

    @property
    def path(self) -> str:
        return self.scope["path"]

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.scope["headers"]}
        return self._headers

    def query(self, expected: str) -> dict[str, str]:
        """The query string's parameters; InvalidInput showing ``expected`` (such as 'by=hour|day') when unreadable."""
        raw = self.scope.get("query_string", b"")
        try:
            pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=bool(raw), max_num_fields=16)
        except (UnicodeDecodeError, ValueError):
            raise InvalidInput(("query",), f"expected {expected}", shown(raw[:80])) from None
        return dict(pairs)

    def header(self, name: bytes) -> str | None:
        """One header by lower-case name, without decoding all of them (the hot path reads three)."""
        for key, value in self.scope["headers"]:
            if key == name:
                return value.decode("latin-1")
        return None

    async def read_body(self, limit: int) -> bytes:
        """The whole body, decoded if it came compressed; PayloadTooLarge as soon as either the body as
        sent or as decoded is known to pass ``limit`` bytes, UnsupportedMediaType for an encoding other
        than gzip or deflate."""
        if self._read:
            return self.body
        length = self.header(b"content-length")
        if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"request body of {int(length)} bytes is over the limit of {limit} bytes; "
                                  "send a smaller body or raise FORWARDPASS_MAX_BODY_BYTES")  # fmt: skip
        if not self._complete and self.receive is not None:
            chunks, size = [], 0
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes; send a smaller body "
                                          "or raise FORWARDPASS_MAX_BODY_BYTES")  # fmt: skip
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            self.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            del chunks
        elif len(self.body) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes; send a smaller body or "
                                  "raise FORWARDPASS_MAX_BODY_BYTES")  # fmt: skip
        encoding = self.header(b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            if len(self.body) <= _INLINE_DECODE and "," not in encoding:  # stacked codings multiply the ratio
                self.body = decode_body(self.body, encoding, limit)
            else:  # size-dependent work stays off the event loop (zlib releases the GIL)
                self.body = await asyncio.to_thread(decode_body, self.body, encoding, limit)
        self._read = True
        return self.body


# compressed bodies up to this size, in one coding, are decoded on the event loop: deflate expands at
# most ~1032:1, so that is at most about 1 MB of output (a millisecond); larger ones, and any body in
# two or more codings (gzip over gzip can reach the body limit from under 1 KiB), go to a thread
_INLINE_DECODE = 1024
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object (the OpenAI API's); InvalidInput at ``body`` otherwise."""
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(("body",), f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(("body",), "expected a JSON object", shown(doc))
    return doc


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` with its Content-Encoding undone (gzip, deflate, or a list of them), never more than ``limit`` bytes.

        decode_body(gzip.compress(b"{}"), "gzip", 1024)  # b"{}"

    PayloadTooLarge when the decoded body passes ``limit`` (a zip bomb stops there), InvalidInput
    for data that is not what the header says, UnsupportedMediaType for any other encoding.
    """
    codings = [c.strip().lower() for c in encoding.split(",")]
    unknown = [c for c in codings if c not in _WBITS and c not in ("", "identity")]
    if unknown:
        raise UnsupportedMediaType(f"Content-Encoding '{encoding}' is not supported (this server decodes gzip "
                                   "and deflate); send the body uncompressed, or compressed with gzip or deflate")
    for coding in reversed(codings):  # the header lists them in the order they were applied
        if coding in _WBITS:
            body = _inflate(body, coding, limit)
    return body


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    out: list[bytes] = []
    size, wbits = 0, _WBITS[coding]
    while True:  # a gzip body may be several members one after the other
        inflater = zlib.decompressobj(wbits)
        try:
            piece = inflater.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            if coding == "deflate" and wbits > 0 and not out:  # raw deflate without the zlib wrapper, as some send
                wbits = -zlib.MAX_WBITS
                continue
            raise InvalidInput(("body",), f"not {coding} data as Content-Encoding says ({exc}); send the body "
                               "compressed as the header says, or uncompressed without it") from None
        size += len(piece)
        out.append(piece)
        if size > limit:
            raise PayloadTooLarge(f"request body decoded from {coding} is over the limit of {limit} bytes; send a "
                                  "smaller body or raise FORWARDPASS_MAX_BODY_BYTES")  # fmt: skip
        if not inflater.eof:
            raise InvalidInput(("body",), f"the {coding} body ends before its compressed stream does; send the "
                               "whole body")  # fmt: skip
        data = inflater.unused_data
        if not data or coding == "deflate":
            break
    if data:
        raise InvalidInput(("body",), f"{len(data)} bytes follow the end of the {coding} stream; send one stream")
    return out[0] if len(out) == 1 else b"".join(out)


@dataclass
class Response:
    """Status, body and headers; ``json()`` and ``text()`` build the common ones."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
        """``data`` as JSON. An error's body (status >= 400) never fails to encode: what orjson cannot write
        (integers past 64 bits, other objects) is written by the json module, as a string where need be."""
        try:
            body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:  # orjson.JSONEncodeError
            if status < 400:
                raise
            body = _error_json(data, status)
        return cls(status, body, "application/json", headers or [])

    @classmethod
    def text(cls, text: str | bytes, status: int = 200, content_type: str = "text/plain; charset=utf-8") -> Response:
        return cls(status, text.encode() if isinstance(text, str) else text, content_type)

    def encode(self, keep_alive: bool = True, head: bool = False) -> bytes:
        """The whole HTTP/1.1 response as one buffer: status line, headers, body."""
        lines = [_STATUS_LINES.get(self.status) or b"HTTP/1.1 %d %s\r\n" % (self.status, _reason(self.status)),
                 b"content-type: ", self.content_type.encode(),
                 b"\r\ncontent-length: ", b"%d" % len(self.body), b"\r\n"]  # fmt: skip
        for name, value in self.headers:
            lines += [name, b": ", value, b"\r\n"]
        if not keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        if not head:
            lines.append(self.body)
        return b"".join(lines)

    def asgi_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", self.content_type.encode()), (b"content-length", b"%d" % len(self.body)),
                *self.headers]  # fmt: skip


class StreamingResponse:
    """A response whose body is produced while it is sent (server-sent events), with chunked encoding.

    If the client goes away, the server cancels the task iterating ``chunks``; the iterator's
    ``finally`` is where a producer learns it (the generation scheduler frees the request's slot).
    """

    def __init__(self, chunks: AsyncIterator[bytes], status: int = 200, content_type: str = "text/event-stream",
                 headers: list[tuple[bytes, bytes]] | None = None):  # fmt: skip
        self.chunks, self.status, self.content_type = chunks, status, content_type
        self.headers = [(b"cache-control", b"no-cache"), *(headers or [])]

    def head(self, keep_alive: bool = True) -> bytes:
        """Status line and headers, for HTTP/1.1 chunked transfer."""
        lines = [_STATUS_LINES.get(self.status) or b"HTTP/1.1 %d %s\r\n" % (self.status, _reason(self.status)),
                 b"content-type: ", self.content_type.encode(), b"\r\ntransfer-encoding: chunked\r\n"]  # fmt: skip
        for name, value in self.headers:
            lines += [name, b": ", value, b"\r\n"]
        if not keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def asgi_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", self.content_type.encode()), *self.headers]


class Finally:
    """A streamed answer's chunks with a clean-up that runs once when they end, fail, are closed (the client
    left, even before the first chunk) or are dropped unsent: a generator's ``finally`` would not run in the
    last two cases. The tenancy settles a stream's charge so; a generation frees its slot."""

    def __init__(self, chunks: AsyncIterator[bytes], cleanup: Callable[[], None]):
        self._chunks = chunks
        self._cleanup: Callable[[], None] | None = cleanup

    def __aiter__(self) -> Finally:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except BaseException:  # StopAsyncIteration (the end), an error, or a cancellation
            self._done()
            raise

    async def aclose(self) -> None:
        self._done()
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    def _done(self) -> None:
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()

    def __del__(self) -> None:
        self._done()


class ClientGone(Exception):
    """A writer's client went away while a streamed answer was being written: stop producing it."""


class Writer(Protocol):
    """Where an answer goes: one implementation per HTTP stack (AsgiWriter below for ASGI servers such as
    uvicorn; server/protocol.py's for our own HTTP/1.1). ``deliver`` drives either the same way."""

    async def whole(self, response: Response) -> None:
        """Write a complete answer."""
        ...

    async def open(self, response: StreamingResponse) -> None:
        """Write a streamed answer's status and headers."""
        ...

    async def chunk(self, data: bytes) -> None:
        """Write one piece of a streamed answer (waiting while the client is slow); ClientGone if it left."""
        ...

    async def end(self) -> None:
        """End a streamed answer."""
        ...


async def deliver(response: Response | StreamingResponse, writer: Writer) -> None:
    """Write ``response`` through ``writer``. A streamed answer's producer is closed however it ends, so
    that it learns the client left (the generation scheduler then frees the request's slot)."""
    if isinstance(response, Response):
        await writer.whole(response)
        return
    try:
        await writer.open(response)
        async for chunk in response.chunks:
            if chunk:
                await writer.chunk(chunk)
        await writer.end()
    except ClientGone:
        pass
    finally:
        aclose = getattr(response.chunks, "aclose", None)
        if aclose is not None:
            await aclose()


class AsgiWriter:
    """The Writer of an ASGI server: answers as http.response.start / http.response.body messages."""

    def __init__(self, send: Callable[[dict[str, Any]], Awaitable[None]]):
        self.send = send

    async def whole(self, response: Response) -> None:
        await self.send({"type": "http.response.start", "status": response.status, "headers": response.asgi_headers()})
        await self.send({"type": "http.response.body", "body": response.body})

    async def open(self, response: StreamingResponse) -> None:
        await self.send({"type": "http.response.start", "status": response.status, "headers": response.asgi_headers()})

    async def chunk(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self) -> None:
        await self.send({"type": "http.response.body", "body": b""})


def _error_json(data: Any, status: int) -> bytes:
    try:
        return json.dumps(data, default=repr).encode()
    except Exception:  # a cycle, or a repr that raises: still an answer, with the status
        log.exception("an error's body could not be encoded")
        return b'{"error": "%d %s"}' % (status, _reason(status))


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}

Handler = Callable[..., Awaitable[Response | StreamingResponse]]
OnError = Callable[..., Response]  # (exception, stats) -> the error's response in a route's wire shape
Unmatched = Callable[[str, str, bool], Response]  # (method, path, path exists) -> an API's 404 / 405


class Router:
    """Routes as (method, pattern, handler, errors); '{name}' segments become keyword arguments, ``errors``
    renders what the handler raises in the route's wire shape.

    Routes are tried in order, so the hot ones go first.
    """

    def __init__(self, routes: list[tuple[str, str, Handler, OnError]],
                 unmatched: Sequence[tuple[str, Unmatched]] = ()):  # fmt: skip
        self.routes = [(method, _compile(pattern), handler, errors) for method, pattern, handler, errors in routes]
        self.paths = [route[1] for route in routes]
        self._unmatched = list(unmatched)

    def unmatched(self, method: str, path: str, path_exists: bool) -> Response | None:
        """The answer of the API whose prefix ``path`` starts with, for a request no route takes (None: the
        server's own 404 / 405): ``Router(routes, unmatched=[("/v1/", openai_unknown_route)])``."""
        for prefix, answer in self._unmatched:
            if path.startswith(prefix):
                return answer(method, path, path_exists)
        return None

    def match(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], bool, OnError | None]:
        """(handler, params, path_exists, errors): path_exists tells 405 from 404 when handler is None."""
        path_exists = False
        for route_method, regex, handler, errors in self.routes:
            found = regex.fullmatch(path)
            if found is not None:
                if route_method == method:
                    return handler, found.groupdict(), True, errors
                path_exists = True
        return None, {}, path_exists, None


def _compile(pattern: str) -> re.Pattern[str]:
    escaped = re.escape(pattern).replace(r"\{", "{").replace(r"\}", "}")
    regex = re.sub(r"\{(\w+)\}", lambda m: rf"(?P<{m.group(1)}>[^/:]+)", escaped)
    return re.compile(regex)
