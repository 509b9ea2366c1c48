"""Domain errors to HTTP, in one place: V2's {"error": "..."} with the status the error carries."""

from __future__ import annotations

import logging

from forwardpass.errors import ForwardpassError, InvalidInput, Overloaded
from forwardpass.server.http import Response

log = logging.getLogger("forwardpass.server")


def error_response(exc: BaseException) -> Response:
    """The response for any exception; unexpected ones are logged and become a 500."""
    if isinstance(exc, ForwardpassError):
        body: dict[str, object] = {"error": exc.message, "type": exc.type}
        if isinstance(exc, InvalidInput):
            body["detail"] = [exc.to_dict()]
        headers = []
        if isinstance(exc, Overloaded):
            headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
        return Response.json(body, exc.status, headers)
    log.exception("unexpected error", exc_info=exc)
    return Response.json({"error": f"internal error: {type(exc).__name__}", "type": "internal_error"}, 500)
