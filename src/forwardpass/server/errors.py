"""Domain errors to HTTP, in one place: V2's {"error": "..."} with the status the error carries.

An unexpected error (a bug) answers 500; its traceback is logged once per distinct cause (exception
type and the line that raised it), so a client repeating a bad request cannot fill the log. Every
occurrence is counted in ``forwardpass_requests_total{status="500"}`` by whoever holds the stats.
"""

from __future__ import annotations

import logging

from forwardpass.errors import ForwardpassError, InvalidInput, shown  # noqa: F401 (shown: re-exported)
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
        headers = []
        retry = getattr(exc, "retry_after", None)  # Overloaded, and ModelNotReady while loading or draining
        if retry is not None:
            headers.append((b"retry-after", str(max(1, round(retry))).encode()))
        return Response.json(body, exc.status, headers)
    log_unexpected(exc)
    if stats is not None:
        stats.unexpected()
    return Response.json({"error": f"internal error: {type(exc).__name__}", "type": "internal_error"}, 500)


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
