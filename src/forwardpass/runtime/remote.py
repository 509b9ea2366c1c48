"""The remote runtime: the forward pass is a V2 infer call on another server (forwardpass or Triton).

model.yaml::

    task: classification             # pre- and post-processing run here, as for a local model
    runtime: {kind: remote, url: "http://10.0.0.5:8000", model: iris, version: 1, timeout_ms: 5000}

Inputs and outputs come from the remote's model metadata (``GET /v2/models/iris/versions/1``) unless
model.yaml declares them. Tensors travel as V2 binary tensors (a JSON header of
``Inference-Header-Content-Length`` bytes, then raw little-endian data; BYTES elements are a 4-byte length
and the bytes), or as JSON with ``binary: false``. One pool of kept-alive connections serves every worker
thread. Usage::

    rt = RemoteRuntime("http://127.0.0.1:8001", "iris", timeout_ms=2000)
    (probs,) = rt.run({"input": np.zeros((1, 4), np.float32)}, ["probabilities"])
    rt.close()

Errors, mapped here once for every entrypoint: the remote's 400 is our InvalidInput (the client's 400, as
for a local model); a remote that is down, refuses, resets or does not serve the model is a RemoteError
(503, Retry-After), an answer that is not V2 or a remote 5xx a RemoteError (502); no answer within
``timeout_ms`` a RequestTimeout (504). At load, an unreachable remote or an unknown model is a
ModelLoadError naming the URL (the version is then UNAVAILABLE with that reason; hot reload retries).
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args
from urllib.parse import quote, urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from forwardpass._deps import require
from forwardpass.errors import (
    ForwardpassError,
    InvalidInput,
    ModelConfigError,
    ModelLoadError,
    PayloadTooLarge,
    RemoteError,
    RequestTimeout,
)
from forwardpass.runtime.base import TensorInfo
from forwardpass.tensors import Datatype, from_numpy, to_numpy

if TYPE_CHECKING:
    from forwardpass.config import ModelConfig

_DATATYPES = frozenset(get_args(Datatype))
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
RunFn = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]
Body = tuple[bytes, int | None]  # a V2 body and its JSON header's length (None: all JSON)
_PURPOSE = "the remote runtime (runtime: {kind: remote})"  # for the install hint


class RemoteOptions(BaseModel):
    """``runtime: {kind: remote, ...}``: where the model runs and how to talk to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str  # http(s)://host[:port][/prefix] of the V2 server
    model: str = Field(min_length=1, max_length=256)  # the model's name there
    version: int | None = Field(None, ge=1)  # None: the remote's default (its newest) version
    timeout_ms: float = Field(5000.0, gt=0, le=3_600_000)  # per call: connect, send and the whole answer
    max_connections: int = Field(16, ge=1, le=1024)  # kept alive; more callers wait for one (within timeout_ms)
    headers: dict[str, str] = {}  # sent with every call (a gateway's own key, a tenant header)
    api_key: str | None = Field(None, min_length=1)  # Authorization: Bearer <key> (forwardpass's --api-key)
    api_key_env: str | None = Field(None, min_length=1)  # or the name of an environment variable holding it
    binary: bool = True  # V2 binary tensors; false: JSON (slower, for servers without the extension)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
        except ValueError as exc:
            raise ValueError(f"expected an http:// or https:// URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host, such as http://10.0.0.5:8000")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("expected a URL without ?query, #fragment or user:password@ (use api_key or headers)")
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not name or not set(name) <= _TOKEN:
                raise ValueError(f"header name {name!r} is not an HTTP token (letters, digits, '-')")
            if any(c in text for c in "\r\n\0"):
                raise ValueError(f"header {name}'s value holds a line break or NUL")
        return value

    @model_validator(mode="after")
    def _one_key(self) -> RemoteOptions:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        return self


def from_config(config: ModelConfig, folder: Path, version: int) -> RemoteRuntime:
    """The registry's factory (``runtime: {kind: remote, url: ..., model: ...}``); ``version`` is the local one."""
    file = folder / "model.yaml"
    options = config.runtime.options(RemoteOptions, file)
    key = options.api_key
    if options.api_key_env is not None:
        key = os.environ.get(options.api_key_env)
        if not key:
            raise ModelConfigError(str(file), "runtime.api_key_env", f"environment variable {options.api_key_env} "
                                   "is not set", f"export {options.api_key_env}=<the remote's key>")  # fmt: skip
    return RemoteRuntime(
        options.url, options.model, version=options.version, timeout_ms=options.timeout_ms,
        max_connections=options.max_connections, headers=options.headers, api_key=key, binary=options.binary,
        source=str(file),
    )  # fmt: skip


class RemoteRuntime:
    """A model served by another V2 server, run as if it were local (see the module docstring).

    Thread-safe: every worker thread shares one pool of ``max_connections`` kept-alive connections.
    """

    guarded: frozenset[str] = frozenset()  # the remote checks its own inputs; ours are checked by Model
    probe_ms: float | None = None  # a network call: the engine queues it off the event loop
    threads: int = 1  # it waits on a socket, keeping no core busy

    def __init__(
        self,
        url: str,
        model: str,
        *,
        version: int | None = None,
        timeout_ms: float = 5000.0,
        max_connections: int = 16,
        headers: Mapping[str, str] | None = None,
        api_key: str | None = None,
        binary: bool = True,
        source: str = "",
    ):
        self._urllib3 = require("urllib3", "remote", _PURPOSE)
        self._orjson = require("orjson", "remote", _PURPOSE)
        self.url, self.model, self.version, self.binary = url.rstrip("/"), model, version, binary
        self.timeout = timeout_ms / 1000
        self._what = f"model '{model}'" + (f" version {version}" if version is not None else "") + f" at {self.url}"
        path = f"{urlsplit(self.url).path}/v2/models/{quote(model, safe='')}"
        path += f"/versions/{version}" if version is not None else ""
        self._metadata_path, self._infer_path = path, path + "/infer"
        self._headers = dict(headers or {})
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._pool = self._urllib3.connection_from_url(
            self.url, maxsize=max_connections, block=True, retries=False, timeout=self._urllib3.Timeout(self.timeout)
        )
        self._prepared: dict[tuple[str, ...], RunFn] = {}
        self.inputs, self.outputs = self._metadata(source)
        self._all_outputs = [o.name for o in self.outputs]

    def __repr__(self) -> str:
        return f"<RemoteRuntime {self._what}>"

    def close(self) -> None:
        """Close the pool's connections; a later run is a 503 naming the remote."""
        self._pool.close()

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        """One V2 infer call; outputs in ``output_names`` order (all outputs when None)."""
        key = tuple(output_names or self._all_outputs)
        run = self._prepared.get(key) or self.prepare(key)
        return run(feeds)

    def prepare(self, output_names: Sequence[str] | None = None) -> RunFn:
        """A run function for fixed outputs: ``run(feeds) -> [arrays]`` (the outputs' JSON is built once)."""
        names = list(output_names or self._all_outputs)
        unknown = [n for n in names if n not in self._all_outputs]
        if unknown:
            raise InvalidInput(("outputs", unknown[0]), f"unknown output; the remote model has {self._all_outputs}")
        encode = _encoder(names, self.binary)

        def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
            body, header_length = encode(feeds)
            if header_length is None:
                headers = {**self._headers, "Content-Type": "application/json"}
            else:
                headers = {**self._headers, "Content-Type": "application/octet-stream",
                           "Inference-Header-Content-Length": str(header_length)}  # fmt: skip
            return self._outputs(self._call("POST", self._infer_path, body, headers), names)

        self._prepared[tuple(names)] = run
        return run

    # -- the wire ----------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]) -> Any:
        """One HTTP exchange within the timeout; a connection the remote dropped unanswered is retried once
        (a kept-alive connection it closed as we reused it; a forward pass has no side effects)."""
        errors = self._urllib3.exceptions
        deadline = time.monotonic() + self.timeout
        for attempt in (1, 2):
            left = max(deadline - time.monotonic(), 0.001)
            try:
                return self._pool.urlopen(method, path, body=body, headers=headers, retries=False, redirect=False,
                                          timeout=self._urllib3.Timeout(total=left), pool_timeout=left)  # fmt: skip
            except errors.NewConnectionError as exc:  # refused, no route, unknown host (before the timeouts below)
                raise RemoteError(f"{self._what} is unreachable: {_reason(exc)}; start it, or correct "
                                  "runtime.url", unreachable=True) from None  # fmt: skip
            except (errors.TimeoutError, errors.EmptyPoolError):
                raise RequestTimeout(f"{self._what} did not answer within runtime.timeout_ms "
                                     f"({self.timeout * 1000:g} ms)") from None  # fmt: skip
            except errors.ProtocolError as exc:
                if attempt == 2:
                    raise RemoteError(f"{self._what} closed the connection without an answer: {_reason(exc)}",
                                      unreachable=True) from None  # fmt: skip
            except errors.ClosedPoolError:
                raise RemoteError(f"{self._what}: this model version was retired (its connections are closed); "
                                  "retry", unreachable=True) from None  # fmt: skip
            except errors.HTTPError as exc:  # TLS failures, malformed answers
                raise RemoteError(f"{self._what} failed: {_reason(exc)}", unreachable=True) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _metadata(self, source: str) -> tuple[list[TensorInfo], list[TensorInfo]]:
        where = f"{source}: runtime" if source else "runtime"
        try:
            answer = self._call("GET", self._metadata_path, None, self._headers)
        except ForwardpassError as exc:
            failed = ModelLoadError(f"{where}: cannot read the model's metadata: {exc.message}")
            failed.retry_after = getattr(exc, "retry_after", None)  # unreachable: hot reload tries again later
            raise failed from None
        if answer.status != 200:
            hint = {404: "correct runtime.model (and runtime.version), or load the model on that server",
                    401: "set runtime.api_key (or runtime.api_key_env) to a key that server accepts",
                    403: "set runtime.api_key (or runtime.api_key_env) to a key that server accepts"}  # fmt: skip
            fix = hint.get(answer.status, "check that runtime.url is a V2 inference server")
            raise ModelLoadError(f"{where}: the server at {self.url} answered {answer.status} for model "
                                 f"'{self.model}': {self._message(answer)}; {fix}")  # fmt: skip
        try:
            doc = self._orjson.loads(answer.data)
            if not isinstance(doc, dict):
                raise ValueError("expected a JSON object")
            return _infos(doc, "inputs"), _infos(doc, "outputs")
        except ValueError as exc:  # orjson's JSONDecodeError is a ValueError
            raise ModelLoadError(f"{where}: {self.url} did not answer V2 model metadata for model '{self.model}' "
                                 f"({exc}); check that runtime.url is a V2 inference server") from None  # fmt: skip

    def _outputs(self, answer: Any, names: list[str]) -> list[np.ndarray]:
        if answer.status != 200:
            raise self._failure(answer)
        try:
            header = answer.headers.get("inference-header-content-length")
            found = decode_response(answer.data, None if header is None else int(header))
            return [found[n] for n in names]
        except (ValueError, TypeError, KeyError) as exc:
            missing = f"no output '{exc.args[0]}'" if isinstance(exc, KeyError) else str(exc)
            raise RemoteError(f"{self._what} answered with something that is not a V2 inference response: "
                              f"{missing}") from None  # fmt: skip

    def _failure(self, answer: Any) -> ForwardpassError:
        """The error a remote's non-200 answer is for our caller."""
        status, message = answer.status, self._message(answer)
        if status == 400:  # its InvalidInput: the client's mistake, a 400 here as for a local model
            return InvalidInput(("inputs",), f"the remote model rejected the inputs: {message}")
        if status == 413:
            return PayloadTooLarge(f"the inputs are larger than {self._what} accepts: {message}")
        if status == 404:
            return RemoteError(f"{self._what} is not served there any more: {message}", unreachable=True)
        if status in (429, 503):
            retry = _seconds(answer.headers.get("retry-after"))
            return RemoteError(f"{self._what} is busy or not ready ({status}): {message}", unreachable=True,
                               retry_after=retry)  # fmt: skip
        if status == 504:
            return RequestTimeout(f"{self._what} timed out: {message}")
        if status in (401, 403):
            return RemoteError(f"{self._what} refused our credentials ({status}): {message}; set runtime.api_key")
        return RemoteError(f"{self._what} answered {status}: {message}")

    def _message(self, answer: Any) -> str:
        """The remote's error message: V2's {"error": "..."}, or the start of the body."""
        try:
            doc = self._orjson.loads(answer.data)
            if isinstance(doc, dict) and isinstance(doc.get("error"), str):
                return str(doc["error"])
            if isinstance(doc, dict) and isinstance(doc.get("error"), dict):  # OpenAI-shaped gateways
                return str(doc["error"].get("message", doc["error"]))
        except ValueError:
            pass
        text = answer.data[:300].decode("utf-8", errors="replace").strip()
        return text or "(no body)"


# -- the V2 codec (the client side of server/v2.py) ------------------------------------------------


def encode_request(feeds: Mapping[str, np.ndarray], outputs: Sequence[str], *, binary: bool = True) -> Body:
    """A V2 infer request body asking for ``outputs``, and its JSON header's length (None: all JSON).

        body, header_length = encode_request({"input": x}, ["probabilities"])
        # POST it with Inference-Header-Content-Length: header_length
    """
    return _encoder(list(outputs), binary)(feeds)


def decode_response(body: bytes, header_length: int | None) -> dict[str, np.ndarray]:
    """A V2 infer response's outputs, {name: array}; ValueError for anything that is not one."""
    orjson = require("orjson", "remote", _PURPOSE)
    length = len(body) if header_length is None else header_length
    if not 0 <= length <= len(body):
        raise ValueError(f"Inference-Header-Content-Length {length} is past the {len(body)}-byte body")
    return _decode_outputs(orjson.loads(body[:length]), memoryview(body)[length:])


def _encoder(names: list[str], binary: bool) -> Callable[[Mapping[str, np.ndarray]], Body]:
    """The body builder for fixed outputs: their part of the JSON is built once."""
    orjson = require("orjson", "remote", _PURPOSE)
    dumps = partial(orjson.dumps, option=orjson.OPT_SERIALIZE_NUMPY)
    if binary:
        wanted: dict[str, Any] = {"outputs": [{"name": n, "parameters": {"binary_data": True}} for n in names],
                                  "parameters": {"binary_data_output": True}}  # fmt: skip
        return partial(_binary_body, wanted=wanted, dumps=dumps)
    return partial(_json_body, wanted={"outputs": [{"name": n} for n in names]}, dumps=dumps)


def _binary_body(feeds: Mapping[str, np.ndarray], wanted: dict[str, Any], dumps: Any) -> Body:
    entries: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for name, array in feeds.items():
        datatype = _datatype(name, array)
        data = _bytes_tensor(name, array) if datatype == "BYTES" else _little_endian(array)
        entries.append({"name": name, "datatype": datatype, "shape": list(array.shape),
                        "parameters": {"binary_data_size": len(data)}})  # fmt: skip
        chunks.append(data)
    head = dumps({"inputs": entries, **wanted})
    return b"".join([head, *chunks]), len(head)


def _json_body(feeds: Mapping[str, np.ndarray], wanted: dict[str, Any], dumps: Any) -> Body:
    entries = []
    for name, array in feeds.items():
        datatype = _datatype(name, array)
        if datatype == "BYTES":
            data: Any = [_text(name, v) for v in array.reshape(-1).tolist()]
        else:  # FP16 as float32 (JSON numbers), as the server encodes it; NaN becomes null, which a remote refuses
            data = np.ascontiguousarray(array.astype(np.float32) if datatype == "FP16" else array).reshape(-1)
        entries.append({"name": name, "datatype": datatype, "shape": list(array.shape), "data": data})
    return dumps({"inputs": entries, **wanted}), None


def _datatype(name: str, array: np.ndarray) -> str:
    try:
        return from_numpy(array.dtype)
    except ValueError:
        raise InvalidInput(("inputs", name), f"numpy dtype {array.dtype} has no V2 datatype") from None


def _little_endian(array: np.ndarray) -> memoryview:
    """The tensor's bytes, without a copy when it is already contiguous little-endian (joined into the body once)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8).data


def _bytes_tensor(name: str, array: np.ndarray) -> bytes:
    parts = []
    for value in array.reshape(-1).tolist():
        data = value.encode() if isinstance(value, str) else value
        if not isinstance(data, bytes):
            raise InvalidInput(("inputs", name), "expected strings or bytes for datatype BYTES", type(value).__name__)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        raise InvalidInput(("inputs", name), "expected UTF-8 text: JSON carries only text; set runtime.binary: "
                           "true to send any bytes") from None  # fmt: skip


def _decode_outputs(doc: Any, binary: memoryview) -> dict[str, np.ndarray]:
    """{name: array} from a V2 response's JSON and its binary tail; ValueError for anything malformed."""
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise ValueError("expected a JSON object with a list of outputs")
    found, offset = {}, 0
    for item in doc["outputs"]:
        info = _info(item)
        count = math.prod(info.shape)
        if -1 in info.shape:
            raise ValueError(f"output '{info.name}': shape {list(info.shape)} has a dynamic (-1) size")
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if type(size) is not int or not 0 <= size <= len(binary) - offset:
                raise ValueError(f"output '{info.name}': binary_data_size {size!r} past the binary data")
            raw = binary[offset : offset + size]
            offset += size
            array = _from_bytes(raw, count) if info.datatype == "BYTES" else _from_binary(info, raw, count)
        elif not isinstance(item.get("data"), list):
            raise ValueError(f"output '{info.name}': expected data (a list) or parameters.binary_data_size")
        elif info.datatype == "BYTES":
            array = np.empty(len(item["data"]), dtype=object)
            array[:] = item["data"]
        else:
            array = np.asarray(item["data"], dtype=to_numpy(info.datatype))
        if array.size != count:
            raise ValueError(f"output '{info.name}': shape {list(info.shape)} needs {count} elements, got {array.size}")
        found[info.name] = array.reshape(info.shape)
    return found


def _from_binary(info: TensorInfo, raw: memoryview, count: int) -> np.ndarray:
    dtype = to_numpy(info.datatype)
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"output '{info.name}': {info.datatype} {list(info.shape)} needs {count * dtype.itemsize} "
                         f"bytes, got {len(raw)}")  # fmt: skip
    # a copy: callers (post-processing, the response cache) get a writable array that owns its memory
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


def _from_bytes(raw: memoryview, count: int) -> np.ndarray:
    """BYTES elements (4-byte little-endian length, then the bytes) as str where they are UTF-8, as ONNX
    Runtime gives string outputs, else bytes."""
    items: list[str | bytes] = []
    pos = 0
    while pos < len(raw) and len(items) <= count:
        if pos + 4 > len(raw):
            raise ValueError("a BYTES element's length prefix is cut off")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise ValueError(f"a BYTES element of {n} bytes runs past the output's data")
        value = bytes(raw[pos + 4 : pos + 4 + n])
        try:
            items.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            items.append(value)
        pos += 4 + n
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _info(item: Any) -> TensorInfo:
    if not isinstance(item, dict):
        raise ValueError(f"expected a tensor object with name, datatype and shape, got {type(item).__name__}")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tensor's name must be a string, got {name!r}")
    if not isinstance(datatype, str) or datatype not in _DATATYPES:
        raise ValueError(f"tensor '{name}': datatype {datatype!r} is not a V2 datatype")
    if not isinstance(shape, list) or len(shape) > 32 or any(type(d) is not int or d < -1 for d in shape):
        raise ValueError(f"tensor '{name}': shape {shape!r} is not a list of sizes (-1 for dynamic)")
    return TensorInfo(name, datatype, tuple(shape))


def _infos(doc: dict[str, Any], key: str) -> list[TensorInfo]:
    items = doc.get(key)
    if not isinstance(items, list) or not items:
        raise ValueError(f"'{key}' is not a non-empty list of tensors")
    return [_info(item) for item in items]


def _seconds(header: str | None) -> float | None:
    try:
        return max(float(header), 0.0) if header is not None else None
    except ValueError:
        return None


def _reason(exc: BaseException) -> str:
    """The useful part of a urllib3 error ('connection refused'), without its object reprs."""
    cause = exc.__context__ or exc.__cause__ or exc
    while (cause.__context__ or cause.__cause__) is not None and not isinstance(cause, OSError):
        cause = cause.__context__ or cause.__cause__  # type: ignore[assignment]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    text = str(exc)
    return text.split(": ", 1)[-1] if "<" in text else text
