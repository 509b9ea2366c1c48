"""Who may call what: API keys with tiers for inference, an admin key for repository control.

Every route in routes.py declares its access level; ``Keys.guard`` wraps the handler with the
check and with the tenancy (server/tenancy.py: quotas, rate limits, metering). Keys come from
keys.yaml (ids, SHA-256 of the secret, tier, owner, expiry: monitoring/keys.py) and from the flat
files of --api-key-file / --admin-key-file (tier ``unlimited``). Keys are *required* with
--require-api-key, with a flat inference key file, or when serving keys.yaml on an address other
than loopback:

    PUBLIC   /v2/health/*                     no key
    METRICS  /metrics                         a key when required, unless --public-metrics
    INFER    inference, metadata, /v1/models  a key when required; else a known key (its tier) or none
                                              (the ``anonymous`` tier)
    ADMIN    /v2/repository/*                 an admin key once any is set (403 for an inference key)

Keys come in ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (or, from a browser's WebSocket, which
can send no header, as the subprotocol ``bearer.<base64url of the key>``); the server keeps only their
SHA-256 digests, so comparing them leaks nothing about a key's prefix.

    keys = Keys.from_config(config, tenancy)
    handler = keys.guard(handlers.infer, Access.INFER, metered=True)
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from forwardpass.errors import Forbidden, ForwardpassError, Unauthorized
from forwardpass.monitoring import default_keys_file
from forwardpass.monitoring.keys import ANONYMOUS, Caller, KeyRegistry, Tiers, digest
from forwardpass.server.config import ServeConfig
from forwardpass.server.http import Request
from forwardpass.server.tenancy import Tenancy

Handler = Callable[..., Awaitable[Any]]


class Access(enum.Enum):
    """What a route needs (see the module docstring)."""

    PUBLIC = "public"
    METRICS = "metrics"
    INFER = "infer"
    ADMIN = "admin"


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


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class Keys:
    """The keys a server knows (keys.yaml and the flat key files), whether they are required, and the check."""

    def __init__(self, registry: KeyRegistry, required: bool, tenancy: Tenancy | None = None,
                 public_metrics: bool = False):  # fmt: skip
        self.registry, self.required, self.public_metrics = registry, required, public_metrics
        self.tenancy = tenancy or Tenancy(registry.tiers, None, None)
        self.admin_set = registry.has_admin
        self.anonymous = Caller(ANONYMOUS, registry.tiers.tiers[ANONYMOUS])

    @classmethod
    def from_config(cls, config: ServeConfig, tenancy: Tenancy | None = None) -> Keys:
        """Keys from keys.yaml (``keys_file``, else the home folder's keys.yaml if there is one), ``api_key``,
        ``api_key_file``, ``admin_key`` and ``admin_key_file``; errors on overlap or a broken file."""

        def collect(value: str | None, file: Path | None, what: str) -> list[str]:
            found = [value] if value else []
            return found + (read_key_file(file, what) if file is not None else [])

        inference = collect(config.api_key, config.api_key_file, "API key")
        admin = collect(config.admin_key, config.admin_key_file, "admin key")
        if set(inference) & set(admin):
            raise ForwardpassError("the admin key must differ from every inference key (--admin-key-file, "
                                   "--api-key-file): an inference key holder could otherwise unload models")  # fmt: skip
        tiers = tenancy.tiers if tenancy is not None else Tiers.load(config.tiers_file)
        unlimited = tiers.tiers["unlimited"]
        extra = {digest(k): Caller(f"key-{digest(k)[:8]}", unlimited, False, "unlimited") for k in inference}
        extra |= {digest(k): Caller(f"admin-{digest(k)[:8]}", unlimited, True, "unlimited") for k in admin}
        registry = KeyRegistry(keys_file(config), tiers, extra)
        required = config.require_api_key or bool(inference) or (bool(registry) and config.host not in _LOOPBACK)
        return cls(registry, required, tenancy, config.public_metrics)

    @property
    def enabled(self) -> bool:
        """True when a route may need a key: keys are required, or an admin key guards repository control."""
        return self.required or self.admin_set or bool(self.registry)

    def check(self, request: Request, access: Access) -> Caller | None:
        """The caller of a request to a route of ``access``; Unauthorized (401) or Forbidden (403) if it may not."""
        if access is Access.PUBLIC or (access is Access.METRICS and (self.public_metrics or not self.required)):
            return None
        if not self.enabled:  # no key anywhere: everyone is anonymous, no digest to compute
            return self.anonymous
        key = _presented_key(request)
        caller = None
        if key is not None:
            try:
                caller = self.registry.identify(key)
            except Unauthorized:
                if self.required or access is Access.ADMIN:
                    raise
        if access is Access.ADMIN:
            if caller is not None and caller.admin:
                return caller
            if not self.admin_set and not self.required:
                return caller or self.anonymous  # no admin key set on an open server: repository control is open
            if caller is None:
                raise Unauthorized("repository control needs the admin key: send 'Authorization: Bearer <key>'")
            hint = "" if self.admin_set else "; start the server with --admin-key-file to enable it"
            raise Forbidden("repository control (load, unload, index) needs the admin key" + hint)
        if caller is None:
            if self.required:
                raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>' or "
                                   "'x-api-key: <key>'")  # fmt: skip
            return self.anonymous
        return caller

    def guard(self, handler: Handler, access: Access, metered: bool = False) -> Handler:
        """``handler`` behind the key check and the caller's limits (a refusal is rendered in the route's error
        shape by App.dispatch); ``metered``: an inference route, recorded in usage."""
        if access is Access.PUBLIC:
            return handler
        tenancy = self.tenancy

        async def guarded(request: Request, **params: str) -> Any:
            caller = self.check(request, access)
            if caller is not None and access is Access.INFER and tenancy.applies(caller):
                tenancy.admit(request, caller, metered, params.get("model", ""))
            return await handler(request, **params)

        return guarded


def keys_file(config: ServeConfig) -> Path | None:
    """keys.yaml: the one configured, else the home folder's when it exists (where ``forwardpass keys create`` writes)."""
    if config.keys_file is not None:
        return config.keys_file
    default = default_keys_file()
    return default if default.exists() else None


def _presented_key(request: Request) -> str | None:
    given = request.header(b"authorization")
    if given is not None and given[:7].lower() == "bearer ":
        return given[7:].strip() or None
    key = request.header(b"x-api-key")
    if key:
        return key
    offered = request.header(b"sec-websocket-protocol")  # a browser's WebSocket: server/stream.py's SUBPROTOCOL
    return _subprotocol_key(offered) if offered else None


def _subprotocol_key(offered: str) -> str | None:
    """The key in ``bearer.<key, base64url>`` (base64url: a subprotocol is an HTTP token, a key may be anything)."""
    for protocol in offered.split(","):
        protocol = protocol.strip()
        if protocol.startswith("bearer."):
            encoded = protocol[7:]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode() or None
            except (ValueError, UnicodeDecodeError):  # not base64url: no key given
                return None
    return None
