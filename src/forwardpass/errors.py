"""The forwardpass error tree.

Every failure a user can cause or meet is one of these; each class carries the
HTTP status it maps to as data, so the server maps errors in one place::

    ForwardpassError (500)
     ├── InvalidInput (400)          request data is wrong: loc, msg, input, expected
     ├── InvalidModelName (400)      a model name with a path separator or '..'
     ├── WrongEndpoint (400)         a model asked through an endpoint of another kind: names the right one
     ├── Unauthorized (401)          no API key, or one the server does not know
     ├── Forbidden (403)             a known key without the right (repository control needs the admin key)
 │    └── QuotaExceeded (403)    a key's monthly quota is used up: says when it resets
 ├── RateLimited (429)           a key over its tier's rate: ``retry_after`` seconds and x-ratelimit-* headers
     ├── UntrustedFile (400)         a pickle/joblib file loaded without --trust
     ├── ModelNotFound (404)         no such model or version in the repository
     ├── ResponseNotFound (404)      a Responses API id not in the server's in-memory store (never, evicted, restarted)
     ├── ModelNotReady (503)         known, loading or draining: retry after ``retry_after`` seconds
     │    ├── ModelUnavailable (404) known, but unloaded or failed to load (the reason says which)
     │    ├── BatcherClosed (503)    the version's batcher is draining: the engine retries on the new version
     │    └── SchedulerClosed (503)  a language model's scheduler is closing (replaced or unloaded)
     ├── LoadFailed (400)            a repository load request whose model does not load
     ├── Overloaded (503)            the model's queue is full: retry after ``retry_after`` seconds
     ├── RequestTimeout (504)        the request waited past its deadline
     ├── PayloadTooLarge (413)       a request body over the server's limit
     ├── UnsupportedMediaType (415)  a body that is neither JSON nor V2 binary tensors
     ├── HttpProtocolError (4xx)     a request our HTTP server cannot parse (malformed, URL or headers too long, slow)
     ├── BatchAborted (400)          a batch job with more failed rows than --max-errors allows
     ├── ModelConfigError (500)      a model.yaml that is broken: file, field, fix
 │    └── SettingsFileError (500) the same for a server settings file (keys.yaml, tiers.yaml)
     ├── ModelLoadError (500)        the model file does not load or disagrees with model.yaml
     │    └── GGUFError (500)        a GGUF file that is not GGUF, is truncated, or lies about a size
     ├── MissingDependency (500)     an optional package is not installed: install hint
     └── RemoteError (502)           a remote runtime's server answered badly; 503 when it is down

Usage::

    try:
        model.predict({"mean radius": "abc"})
    except InvalidInput as e:
        e.loc   # ('instances', 0, 'mean radius')
        e.to_dict()  # {'type': 'invalid_input', 'loc': [...], 'msg': ..., 'input': 'abc'}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ForwardpassError(Exception):
    """Base of every forwardpass error; ``status`` is the HTTP status it maps to."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        """The error as JSON-ready data (pydantic's shape where it applies)."""
        return {"type": self.type, "msg": self.message}


def format_loc(loc: Sequence[str | int]) -> str:
    """('instances', 0, 'mean radius') -> 'instances[0].mean radius'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _short(value: Any, limit: int = 60) -> str:
    if getattr(value, "shape", None) == ():  # numpy scalars read as plain numbers
        value = value.item()
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InvalidInput(ForwardpassError):
    """Request data that does not fit the model: names the field, what was expected and what came."""

    status = 400
    type = "invalid_input"
    _MISSING = object()

    def __init__(self, loc: Sequence[str | int], msg: str, input: Any = _MISSING):
        self.loc = tuple(loc)
        self.msg = msg
        self.input = shown(input)  # a request's deep or huge value is described, never repr()d whole
        where = format_loc(self.loc) or "input"
        came = "" if input is self._MISSING else f" (got {_short(self.input)})"
        super().__init__(f"{where}: {msg}{came}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "loc": list(self.loc), "msg": self.msg}
        if self.input is not self._MISSING:
            out["input"] = _jsonable(self.input)
        return out


_SHOWN_NODES = 32  # containers up to this many elements (all levels together) are shown as they are
_SHOWN_DEPTH = 4


def shown(value: Any) -> Any:
    """``value`` as an error's ``input``: scalars and small containers as they are, anything bigger or
    deeper as a short description, so the error's message never repr()s a request's million elements
    or recurses through its 1,000 nested levels.

        shown([1, 2])            # [1, 2]
        shown([[[[[[1]]]]]])     # 'a list nested more than 4 levels deep'
    """
    if not isinstance(value, (list, dict, tuple)):
        return value
    nodes, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        nodes += len(children)
        if nodes > _SHOWN_NODES:
            return f"a {type(value).__name__} of {len(value)} items"
        for child in children:
            if isinstance(child, (list, dict, tuple)):
                if depth >= _SHOWN_DEPTH:
                    return f"a {type(value).__name__} nested more than {_SHOWN_DEPTH} levels deep"
                stack.append((child, depth + 1))
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return _short(value, 200)


class InvalidModelName(ForwardpassError):
    """A model name that could escape the repository folder."""

    status = 400
    type = "invalid_model_name"


class WrongEndpoint(ForwardpassError):
    """A model addressed through an endpoint that does not serve its kind (a language model over V2 infer)."""

    status = 400
    type = "wrong_endpoint"


class Unauthorized(ForwardpassError):
    """No API key, or a key the server does not know."""

    status = 401
    type = "invalid_api_key"


class Forbidden(ForwardpassError):
    """A valid key that may not do this (repository control needs the admin key)."""

    status = 403
    type = "forbidden"


class QuotaExceeded(Forbidden):
    """A key whose monthly quota (requests or tokens) is used up until ``resets`` (an ISO date, UTC)."""

    type = "insufficient_quota"

    def __init__(self, message: str, resets: str):
        super().__init__(message)
        self.resets = resets


class RateLimited(ForwardpassError):
    """A key over one of its tier's rates; ``retry_after`` seconds until the request would fit, and the
    x-ratelimit-* ``headers`` of the limit it hit."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.retry_after, self.headers = retry_after, headers or []


class UntrustedFile(ForwardpassError):
    """Refusing to unpickle a file that was not marked as trusted."""

    status = 400
    type = "untrusted_file"


class ModelNotFound(ForwardpassError):
    """No model (or version) of that name in the repository."""

    status = 404
    type = "model_not_found"


class ModelNotReady(ForwardpassError):
    """The model exists but is not loaded yet (loading, or the server is stopping): retry after ``retry_after``."""

    status = 503
    type = "model_not_ready"

    def __init__(self, message: str, retry_after: float | None = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ModelUnavailable(ModelNotReady):
    """The model exists but is not served: unloaded through the repository API, or it failed to load.

    404 without Retry-After, not 503: retrying does not help until someone loads or fixes it."""

    status = 404
    type = "model_unavailable"

    def __init__(self, message: str):
        super().__init__(message, retry_after=None)


class LoadFailed(ForwardpassError):
    """A repository load request whose model does not load (Triton: ``failed to load 'X'``)."""

    status = 400
    type = "load_failed"


class Overloaded(ForwardpassError):
    """The queue for a model is full; the server answers 503 with Retry-After."""

    status = 503
    type = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(ForwardpassError):
    """The request was not served before its deadline."""

    status = 504
    type = "timeout"


class PayloadTooLarge(ForwardpassError):
    """The request body is larger than the server accepts."""

    status = 413
    type = "payload_too_large"


class UnsupportedMediaType(ForwardpassError):
    """A Content-Type the endpoint does not read."""

    status = 415
    type = "unsupported_media_type"


class ModelConfigError(ForwardpassError):
    """A broken model.yaml: names the file, the field and the fix."""

    type = "model_config_error"

    def __init__(self, file: str, loc: str, msg: str, fix: str = ""):
        self.file, self.loc, self.msg, self.fix = file, loc, msg, fix
        where = f"{file}: {loc}" if loc else file
        super().__init__(f"{where}: {msg}" + (f"; fix: {fix}" if fix else ""))


class SettingsFileError(ModelConfigError):
    """A broken server settings file (keys.yaml, tiers.yaml): names the file, the field and the fix."""

    type = "settings_file_error"


class ModelLoadError(ForwardpassError):
    """The model file does not load, or its inputs/outputs disagree with model.yaml.

    ``retry_after`` is set when the cause may pass by itself (a remote runtime's server is down): hot
    reload then tries again, backing off, instead of waiting for the folder to change.
    """

    type = "model_load_error"
    retry_after: float | None = None


class MissingDependency(ForwardpassError):
    """An optional package is needed; the message carries the pip command."""

    type = "missing_dependency"


class RemoteError(ForwardpassError):
    """A remote runtime's server (``runtime: {kind: remote}``) failed us: 502 for an answer that is not V2 or
    a remote 5xx; 503 with ``retry_after`` when it cannot be reached, refused or closed the connection."""

    status = 502
    type = "remote_error"

    def __init__(self, message: str, *, unreachable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        if unreachable:
            self.status = 503
        self.retry_after = 1.0 if retry_after is None and unreachable else retry_after


class BatcherClosed(ModelNotReady):
    """The batcher is draining (its model version is being replaced or unloaded)."""


class SchedulerClosed(ModelNotReady):
    """A language model's scheduler is closing: its version is being replaced or unloaded."""


class HttpProtocolError(ForwardpassError):
    """A request the HTTP server cannot take (malformed, an upgrade, a URL or headers too long, too slow)."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.type = status, kind


class BatchAborted(ForwardpassError):
    """More rows failed than --max-errors allows; committed parts stay, so a rerun continues."""

    status = 400
    type = "batch_aborted"


class GGUFError(ModelLoadError):
    """A GGUF file that cannot be used: not GGUF, truncated, lying about a size, or missing what the model needs."""


class ResponseNotFound(ForwardpassError):
    """GET /v1/responses/{id} for a response the store does not hold (sent with store false, evicted, restarted)."""

    status = 404
    type = "not_found"


__all__ = [
    "ForwardpassError",
    "InvalidInput",
    "InvalidModelName",
    "WrongEndpoint",
    "Unauthorized",
    "Forbidden",
    "QuotaExceeded",
    "RateLimited",
    "SettingsFileError",
    "UntrustedFile",
    "ModelNotFound",
    "ModelNotReady",
    "ModelUnavailable",
    "LoadFailed",
    "ModelConfigError",
    "ModelLoadError",
    "MissingDependency",
    "Overloaded",
    "RequestTimeout",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "RemoteError",
    "BatcherClosed",
    "SchedulerClosed",
    "HttpProtocolError",
    "BatchAborted",
    "GGUFError",
    "ResponseNotFound",
    "format_loc",
    "shown",
]
