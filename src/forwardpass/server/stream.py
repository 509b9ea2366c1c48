"""WebSocket streaming: ``/v2/models/{model}[/versions/{v}]/stream``, frames in, results out, in order.

    ws = connect("ws://127.0.0.1:8000/v2/models/vad/stream?drop=oldest")
    ws.send(json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 512], "data": [...]}]}))
    ws.recv()   # the V2 response for that frame (text), in the order the frames came

A text frame is a V2 infer request as JSON; a binary frame is 4 bytes of little-endian JSON header length,
the JSON header, then the binary tensor data (V2's binary extension, with the length moved into the
frame). Each connection of a stateful model (model.yaml ``sequence:``) is one sequence: its first frame
starts it, and the state is freed when the connection ends. Every frame goes through Engine.infer, the
data plane every other entrypoint uses.

Back-pressure: at most ``max_pending`` frames wait per connection; past that the connection stops
reading (``drop=none``, the default), or with ``drop=oldest`` only the newest waiting frame is kept and
its answer says how many were skipped (``parameters.skipped``): a video feed wants the newest frame.

A client that cannot send headers (a browser) sends its key as a subprotocol, ``bearer.<key in base64url>``, beside
``forwardpass`` (see SUBPROTOCOL).

Close codes: 1007 (with the reason) for a frame that is not a V2 request, 1008 for a refused key or
an unknown model, 1011 for a server failure; a frame the model refuses (InvalidInput) is answered with
an error message in its place and the stream goes on.

Both HTTP stacks run ``serve_frames`` over a ``Channel``: app.py's for ASGI servers, protocol.py's for
our own HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from typing import Any, Protocol
from urllib.parse import parse_qs

import orjson

from forwardpass.engine.sequences import StreamId
from forwardpass.errors import ForwardpassError, InvalidInput
from forwardpass.server.errors import log_unexpected
from forwardpass.server.v2 import encode_response, parse_infer_off_loop

log = logging.getLogger("forwardpass.server")

PATH = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[0-9]+))?/stream")
MAX_PENDING = 32  # frames waiting per connection before it stops reading (or drops, with drop=oldest)
INVALID_DATA, POLICY, INTERNAL = 1007, 1008, 1011  # RFC 6455 close codes
# A browser's WebSocket cannot send headers, only subprotocols: it offers ["forwardpass", "bearer.<key>"] (the
# key in base64url without padding: a subprotocol is an HTTP token) and
# the server checks the key as if it came in Authorization, and answers with the "forwardpass" subprotocol.
SUBPROTOCOL, KEY_PREFIX = "forwardpass", "bearer."


def subprotocol(offered: Any) -> str | None:
    """The subprotocol to accept among those a client offered: ours, or none (a client that offered none)."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


class Channel(Protocol):
    """One WebSocket connection, accepted: messages in, messages out, close."""

    async def receive(self) -> str | bytes | None:
        """The next message; None once the client has closed or gone."""
        ...

    async def send(self, message: str | bytes) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


def match(path: str) -> tuple[str, int | None] | None:
    """(model, version) for a stream path, else None."""
    found = PATH.fullmatch(path)
    if found is None:
        return None
    version = found.group("version")
    return found.group("model"), int(version) if version else None


def drop_policy(query: bytes | str) -> str:
    """The ``drop`` query parameter: none (the default) or oldest; InvalidInput otherwise."""
    text = query.decode("latin-1") if isinstance(query, bytes) else query
    values = parse_qs(text).get("drop", ["none"])
    if values[-1] not in ("none", "oldest"):
        raise InvalidInput(("drop",), "expected none or oldest", values[-1])
    return values[-1]


_connections = 0


class Frames(Protocol):
    """Where one connection's frames are answered: the engine in this process (EngineFrames), or a model's
    deployment elsewhere (server/ray_serve.py)."""

    async def answer(self, request: Any, skipped: int) -> str | bytes:
        """The frame's answer: a V2 response (a binary frame when an output is binary) or an error, as text."""
        ...

    async def end(self) -> None:
        """The connection is over: a stateful model's sequence is freed."""
        ...


class EngineFrames:
    """A connection's frames answered by this process's engine; for a stateful model, the connection is one
    sequence (its state kept between frames, freed at the end)."""

    def __init__(self, engine: Any, model: str, version: int | None):
        global _connections
        _connections += 1
        self.engine, self.model, self.version = engine, model, version
        self.served = engine.served(model, version)
        # a key no V2 request can name (its CORRID value, for a model that takes one, is an integer)
        self.sequence = StreamId(_connections) if self.served.sequences is not None else None
        self.first = True

    async def answer(self, request: Any, skipped: int) -> str | bytes:
        if self.sequence is not None:
            request.parameters.update(sequence_id=self.sequence, sequence_start=self.first)
        self.first = False
        return await _answer(self.engine, self.model, self.version, request, skipped)

    async def end(self) -> None:
        if self.sequence is not None and self.served.sequences is not None:
            self.served.sequences.free(self.sequence)


async def serve_stream(engine: Any, model: str, version: int | None, channel: Channel, drop: str,
                       max_elements: int, max_pending: int = MAX_PENDING) -> None:  # fmt: skip
    """Answer a connection's frames with this process's engine, in order, until it closes."""
    await serve_frames(EngineFrames(engine, model, version), channel, drop, max_elements, max_pending)


async def serve_frames(frames: Frames, channel: Channel, drop: str, max_elements: int,
                       max_pending: int = MAX_PENDING) -> None:  # fmt: skip
    """Answer a connection's frames in order until it closes; ``frames.end()`` at the end."""
    pending: deque[str | bytes] = deque()
    skipped = 0
    ready = asyncio.Event()  # pending has a frame, or the client left
    room = asyncio.Event()  # pending has room again (drop=none)
    room.set()
    gone = False

    async def read() -> None:
        nonlocal skipped, gone
        try:
            while True:
                await room.wait()
                message = await channel.receive()
                if message is None:
                    return
                if drop == "oldest" and pending:
                    skipped += len(pending)
                    pending.clear()
                pending.append(message)
                if drop == "none" and len(pending) >= max_pending:
                    room.clear()  # stop reading: the client's frames wait in its socket (back-pressure)
                ready.set()
        finally:
            gone = True
            ready.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            await ready.wait()
            if not pending:
                if gone:
                    return
                ready.clear()
                continue
            frame = pending.popleft()
            room.set()
            dropped, skipped = skipped, 0
            try:
                request = await _parse(frame, max_elements)
            except InvalidInput as exc:
                await channel.close(INVALID_DATA, _reason(exc.message))
                return
            await channel.send(await frames.answer(request, dropped))
    except Exception as exc:  # a bug: the client gets 1011, the server keeps serving
        log_unexpected(exc)
        await channel.close(INTERNAL, "internal error")
    finally:
        reader.cancel()
        try:
            await frames.end()
        except Exception as exc:
            log_unexpected(exc)


async def _parse(frame: str | bytes, max_elements: int) -> Any:
    if isinstance(frame, str):
        return await parse_infer_off_loop(frame.encode(), None, max_elements)
    if len(frame) < 4:
        raise InvalidInput(("frame",), "a binary frame starts with 4 bytes of JSON header length", f"{len(frame)} bytes")
    length = int.from_bytes(frame[:4], "little")
    return await parse_infer_off_loop(frame[4:], length, max_elements)


async def _answer(engine: Any, model: str, version: int | None, request: Any, skipped: int) -> str | bytes:
    """The frame's V2 response (binary frame when any output is binary), or its error as a text frame."""
    try:
        served, outputs = await engine.infer(model, version, request)
    except ForwardpassError as exc:
        return error_frame(exc)
    parameters = {"skipped": skipped} if skipped else None
    payload, header_length = encode_response(model, served.model.version, request.id, outputs, parameters)
    if header_length is None:
        return payload.decode()
    return header_length.to_bytes(4, "little") + payload


def error_frame(exc: ForwardpassError) -> str:
    """A frame's error, answered in its place (the stream goes on): {"error", "type"[, "detail"]} as text."""
    body: dict[str, Any] = {"error": exc.message, "type": exc.type}
    if isinstance(exc, InvalidInput):
        body["detail"] = [exc.to_dict()]
    return orjson.dumps(body).decode()


def _reason(message: str) -> str:
    """A close reason fits in 123 bytes of UTF-8."""
    data = message.encode()[:123]
    return data.decode("utf-8", "ignore")
