"""Who may call what: API keys for inference, a separate admin key for repository control.

Every route in routes.py declares its access level; ``Keys.guard`` wraps the handler with the
check (and returns the handler untouched when no key is configured, so an open server pays
nothing). With any key configured:

    PUBLIC   /v2/health/*                     no key
    METRICS  /metrics                         a key, unless --public-metrics
    INFER    inference, metadata, /v1/models  an inference key or the admin key
    ADMIN    /v2/repository/*                 the admin key only (403 for an inference key)

Keys come in ``Authorization: Bearer <key>`` or ``x-api-key: <key>``; the server keeps only their
SHA-256 digests, so comparing them leaks nothing about a key's prefix.

    keys = Keys.from_config(config)
    handler = keys.guard(handlers.infer, Access.INFER)
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forwardpass.errors import Forbidden, ForwardpassError, Unauthorized
from forwardpass.server.config import ServeConfig
from forwardpass.server.http import Request

Handler = Callable[..., Awaitable[Any]]


class Access(enum.Enum):
    """What a route needs (see the module docstring)."""

    PUBLIC = "public"
    METRICS = "metrics"
    INFER = "infer"
    ADMIN = "admin"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_key_file(path: Path, what: str) -> list[str]:
    """Keys from a file, one per line; blank lines and '#' comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ForwardpassError(f"{what} file {path}: cannot read it ({exc})") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ForwardpassError(f"{what} file {path} holds no key; write one key per line")
    return keys


@dataclass(frozen=True)
class Keys:
    """The digests of the inference and admin keys, and whether /metrics is open."""

    inference: frozenset[bytes] = frozenset()
    admin: frozenset[bytes] = frozenset()
    public_metrics: bool = False

    @classmethod
    def from_config(cls, config: ServeConfig) -> Keys:
        """Keys from ``api_key``/``api_key_file`` and ``admin_key``/``admin_key_file``; errors on overlap."""

        def collect(value: str | None, file: Path | None, what: str) -> list[str]:
            found = [value] if value else []
            return found + (read_key_file(file, what) if file is not None else [])

        inference = collect(config.api_key, config.api_key_file, "API key")
        admin = collect(config.admin_key, config.admin_key_file, "admin key")
        if set(inference) & set(admin):
            raise ForwardpassError("the admin key must differ from every inference key (--admin-key-file, "
                                   "--api-key-file): an inference key holder could otherwise unload models")  # fmt: skip
        return cls(frozenset(map(_digest, inference)), frozenset(map(_digest, admin)), config.public_metrics)

    @property
    def enabled(self) -> bool:
        """True when any key is configured: then every route but the health checks needs one."""
        return bool(self.inference or self.admin)

    def check(self, request: Request, access: Access) -> None:
        """Unauthorized (401) or Forbidden (403) unless the request's key may use a route of ``access``."""
        if not self.enabled or access is Access.PUBLIC or (access is Access.METRICS and self.public_metrics):
            return
        key = _presented_key(request)
        if key is None:
            raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        digest = _digest(key)
        if digest in self.admin:
            return
        if digest not in self.inference:
            raise Unauthorized("the API key is not valid for this server")
        if access is Access.ADMIN:
            raise Forbidden("repository control (load, unload, index) needs the admin key"
                            + ("" if self.admin else "; start the server with --admin-key-file to enable it"))  # fmt: skip

    def guard(self, handler: Handler, access: Access) -> Handler:
        """``handler`` behind the key check (a refusal is rendered in the route's error shape by App.dispatch)."""
        if not self.enabled or access is Access.PUBLIC:
            return handler

        async def guarded(request: Request, **params: str) -> Any:
            self.check(request, access)
            return await handler(request, **params)

        return guarded


def _presented_key(request: Request) -> str | None:
    given = request.header(b"authorization")
    if given is not None and given[:7].lower() == "bearer ":
        return given[7:].strip() or None
    return request.header(b"x-api-key") or None

