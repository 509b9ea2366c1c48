"""Every error to its wire shape, in one place: the status the error carries, and the body of the route's API.

    error_response(exc)   # V2 and everything but OpenAI: {"error": "...", "type": ..., "detail": [...]}
    openai_error(exc)     # OpenAI's {"error": {"message", "type", "param", "code"}}

The route table (server/routes.py) says which shape each route answers in; the HTTP protocol's own
refusals (malformed requests, limits) are HttpProtocolErrors answered by error_response too.

An unexpected error (a bug) answers 500; its traceback is logged once per distinct cause (exception
type and the line that raised it), so a client repeating a bad request cannot fill the log. Every
occurrence is counted in ``forwardpass_requests_total{status="500"}`` by whoever holds the stats.
"""

from __future__ import annotations

import logging
import math

from forwardpass.errors import (  # noqa: F401 (shown: re-exported)
    ForwardpassError,
    InvalidInput,
    InvalidModelName,
    QuotaExceeded,
    RateLimited,
    format_loc,
    shown,
)
from forwardpass.server.http import Response
from forwardpass.stats import Stats

log = logging.getLogger("forwardpass.server")

_MAX_CAUSES = 1024  # distinct causes remembered; past this, tracebacks are not logged at all
_causes: dict[tuple[str, str, int], int] = {}


def error_response(exc: BaseException, stats: Stats | None = None) -> Response:
    """The response for any exception; unexpected ones are logged (once per cause) and become a 500.

    With ``stats``, an unexpected error is also counted (model and version unknown at this level).
    """
    if isinstance(exc, ForwardpassError):
        if exc.status == 500:  # the server's or a model's failure, not the request's: its cause is worth a log line
            log_unexpected(exc)
        body: dict[str, object] = {"error": exc.message, "type": exc.type}
        if isinstance(exc, InvalidInput):
            body["detail"] = [exc.to_dict()]
        return Response.json(body, exc.status, _retry_after(exc))
    log_unexpected(exc)
    if stats is not None:
        stats.unexpected()
    return Response.json({"error": f"internal error: {type(exc).__name__}", "type": "internal_error"}, 500)


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}  # fmt: skip


def openai_error(exc: BaseException, stats: Stats | None = None, model: str = "", version: str = "") -> Response:
    """Any exception as OpenAI's error object (unexpected ones are a 500 without internals, logged once per
    cause, and counted in ``stats`` under ``model`` and ``version`` when given)."""
    if not isinstance(exc, ForwardpassError):
        log_unexpected(exc)
        if stats is not None:
            stats.unexpected(model, version)
        return Response.json({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                                        "param": None, "code": None}}, 500)  # fmt: skip
    if exc.status == 500:
        log_unexpected(exc)
    param = format_loc(exc.loc) if isinstance(exc, InvalidInput) else "model" if isinstance(exc, InvalidModelName) else None
    code = {"model_not_found": "model_not_found", "invalid_api_key": "invalid_api_key"}.get(exc.type, exc.type)
    headers = _retry_after(exc)
    kind = "insufficient_quota" if isinstance(exc, QuotaExceeded) else _TYPES.get(exc.status, "server_error")
    body = {"error": {"message": exc.message, "type": kind, "param": param, "code": code}}
    return Response.json(body, exc.status, headers)




def cause(exc: BaseException) -> tuple[str, str, int]:
    """What identifies a bug: the exception's type and the file and line that raised it."""
    tb = exc.__traceback__
    if tb is None:
        return type(exc).__name__, "", 0
    while tb.tb_next is not None:
        tb = tb.tb_next
    return type(exc).__name__, tb.tb_frame.f_code.co_filename, tb.tb_lineno


def log_unexpected(exc: BaseException) -> None:
    """Log an unexpected error's traceback the first time its cause is seen; later ones at debug level."""
    key = cause(exc)
    seen = _causes.get(key)
    if seen is None and len(_causes) < _MAX_CAUSES:
        _causes[key] = 1
        log.error("unexpected error (this cause is logged once; every occurrence is counted in "
                  'forwardpass_requests_total{status="500"})', exc_info=exc)  # fmt: skip
        return
    if seen is not None:
        _causes[key] = seen + 1
    log.debug("unexpected error again: %s at %s:%d", *key)


def _retry_after(exc: ForwardpassError) -> list[tuple[bytes, bytes]]:
    retry = getattr(exc, "retry_after", None)  # Overloaded; ModelNotReady while loading or draining; RemoteError
    if isinstance(exc, RateLimited):  # whole seconds, never early: a client that waits this long is served
        return [(b"retry-after", b"%d" % max(1, math.ceil(exc.retry_after))), *exc.headers]
    return [] if retry is None else [(b"retry-after", str(max(1, round(retry))).encode())]


# what a connection answers when the application itself failed: prepared, so that it cannot fail too
INTERNAL_ERROR = Response(500, b'{"error":"internal error","type":"internal_error"}')
