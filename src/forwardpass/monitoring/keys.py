"""API keys with tiers: who a request comes from, and what that caller may spend.

keys.yaml holds only each secret's SHA-256, never the secret (``forwardpass keys create`` prints it once)::

    keys:
      - id: alice-1                 # what usage, limits and logs call this key
        sha256: 9f86d08...          # hex digest of the secret
        tier: free                  # a tier of tiers.yaml (or a built-in one)
        owner: alice@example.com    # optional
        expires: 2027-01-01         # optional: refused from this day (UTC) on
        admin: false                # true: may also control the repository

tiers.yaml sets each tier's limits (a missing limit is no limit) and, under ``prices``, what usage costs::

    tiers:
      free: {requests_per_second: 5, burst: 10, tokens_per_minute: 20000, rows_per_minute: 60000,
             concurrent_streams: 2, monthly_requests: 100000, monthly_tokens: 2000000}
    prices:
      "*":     {request: 0.0, input: 0.10, cached_input: 0.05, output: 0.40, rows: 0.01}   # per 1k
      smollm2: {input: 0.05, output: 0.20}

    registry = KeyRegistry.load(Path("keys.yaml"), Tiers.load(Path("tiers.yaml")))
    caller = registry.identify("fp_...secret")   # Caller(id="alice-1", tier=Tier(...)) or Unauthorized
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from forwardpass.config import yaml_problem
from forwardpass.errors import SettingsFileError, Unauthorized

SECRET_PREFIX = "fp_"
_Schema = TypeVar("_Schema", bound=BaseModel)
ANONYMOUS = "anonymous"  # the caller without a key, where keys are not required


class Tier(BaseModel):
    """One tier's limits; None is no limit on that dimension."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_second: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)  # requests that may come at once (default: one second's worth, at least 1)
    tokens_per_minute: int | None = Field(None, ge=1)  # prompt + completion tokens of generation requests
    rows_per_minute: int | None = Field(None, ge=1)  # rows (batch elements) of V2 and :predict requests
    concurrent_streams: int | None = Field(None, ge=1)  # streamed answers (SSE, WebSocket) open at once
    monthly_requests: int | None = Field(None, ge=1)  # per calendar month (UTC)
    monthly_tokens: int | None = Field(None, ge=1)

    @property
    def limited(self) -> bool:
        """True when any rate or concurrency limit applies (quotas alone need no shared buckets)."""
        return any(v is not None for v in (self.requests_per_second, self.tokens_per_minute, self.rows_per_minute,
                                           self.concurrent_streams))  # fmt: skip

    @property
    def request_burst(self) -> float:
        assert self.requests_per_second is not None
        return float(self.burst if self.burst is not None else max(1.0, self.requests_per_second))


class Price(BaseModel):
    """What usage costs, per 1k prompt tokens, cached prompt tokens, completion tokens and rows, and per request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request: float = Field(0.0, ge=0)
    input: float = Field(0.0, ge=0)
    cached_input: float | None = Field(None, ge=0)  # default: the input price
    output: float = Field(0.0, ge=0)
    rows: float = Field(0.0, ge=0)

    def cost(self, usage: dict[str, Any]) -> float:
        """The cost of one usage row (requests, rows, prompt_tokens, cached_tokens, completion_tokens)."""
        cached = usage.get("cached_tokens", 0)
        cached_price = self.input if self.cached_input is None else self.cached_input
        return (usage.get("requests", 0) * self.request + (usage.get("prompt_tokens", 0) - cached) / 1000 * self.input
                + cached / 1000 * cached_price + usage.get("completion_tokens", 0) / 1000 * self.output
                + usage.get("rows", 0) / 1000 * self.rows)  # fmt: skip


UNLIMITED = Tier()
BUILT_IN_TIERS = {
    ANONYMOUS: UNLIMITED,
    "unlimited": UNLIMITED,
    "free": Tier(requests_per_second=5, burst=10, tokens_per_minute=20_000, rows_per_minute=60_000,
                 concurrent_streams=2, monthly_requests=100_000, monthly_tokens=2_000_000),  # fmt: skip
    "pro": Tier(requests_per_second=100, burst=200, tokens_per_minute=1_000_000, rows_per_minute=6_000_000,
                concurrent_streams=32),  # fmt: skip
}


class _TiersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tiers: dict[str, Tier] = Field(default_factory=dict)
    prices: dict[str, Price] = Field(default_factory=dict)


@dataclass(frozen=True)
class Tiers:
    """The tiers by name (the built-in ones, overridden by the file's) and the price table by model ('*': any)."""

    tiers: dict[str, Tier]
    prices: dict[str, Price]

    @classmethod
    def load(cls, path: Path | None) -> Tiers:
        if path is None:
            return cls(dict(BUILT_IN_TIERS), {})
        doc = _read_yaml(path, _TiersFile, "tiers.yaml")
        return cls({**BUILT_IN_TIERS, **doc.tiers}, dict(doc.prices))

    def price(self, model: str) -> Price | None:
        return self.prices.get(model) or self.prices.get("*")

    def add_costs(self, rows: list[dict[str, Any]]) -> float | None:
        """Each usage row's ``cost`` by the price table (None for a model without a price); their sum."""
        costs = []
        for row in rows:
            price = self.price(row["model"])
            row["cost"] = None if price is None else round(price.cost(row), 9)
            if row["cost"] is not None:
                costs.append(row["cost"])
        return round(sum(costs), 9) if costs else None


class KeyRecord(BaseModel):
    """One key of keys.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tier: str = "free"
    owner: str | None = None
    expires: dt.date | None = None
    admin: bool = False

    @field_validator("sha256", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        if isinstance(value, (int, float)):  # a digest of digits (and an 'e') unquoted is a YAML number
            raise ValueError("YAML read the digest as a number: write it in quotes")
        return value.lower() if isinstance(value, str) else value


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyRecord] = Field(default_factory=list)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a key's id (or ``anonymous``), its tier, and whether it may use admin routes."""

    id: str
    tier: Tier
    admin: bool = False
    tier_name: str = ANONYMOUS


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyRegistry:
    """The keys of one keys.yaml, re-read when the file changes (checked at most once a second), so
    ``forwardpass keys create`` and ``revoke`` take effect on a running server without a restart."""

    def __init__(self, path: Path | None, tiers: Tiers, extra: dict[str, Caller] | None = None):
        self.path, self.tiers = path, tiers
        self._extra = extra or {}  # digest -> Caller: keys from --api-key-file / --admin-key-file
        self._by_digest: dict[str, tuple[KeyRecord, Caller]] = {}
        self._seen: dict[str, tuple[KeyRecord, Caller]] = {}  # secret -> its key, for the keys in use (memory only)
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._read()

    def __bool__(self) -> bool:
        return bool(self._by_digest or self._extra)

    @property
    def has_admin(self) -> bool:
        """True when some key may control the repository (keys.yaml's ``admin: true``, or --admin-key-file)."""
        return any(c.admin for c in self._extra.values()) or any(c.admin for _, c in self._by_digest.values())

    @property
    def ids(self) -> list[str]:
        return sorted({record.id for record, _ in self._by_digest.values()} | {c.id for c in self._extra.values()})

    def identify(self, secret: str, today: dt.date | None = None) -> Caller:
        """The caller a presented secret belongs to; Unauthorized for an unknown, revoked or expired key."""
        self._maybe_reload()
        found = self._seen.get(secret)  # a key seen lately: no digest to compute (cleared when the file changes)
        if found is None:
            hashed = digest(secret)
            known = self._extra.get(hashed)
            if known is not None:
                return known
            found = self._by_digest.get(hashed)
            if found is None:
                raise Unauthorized("the API key is not valid for this server")
            if len(self._seen) >= 1024:
                self._seen.clear()
            self._seen[secret] = found
        record, caller = found
        if record.expires is not None and (today or dt.datetime.now(dt.UTC).date()) >= record.expires:
            raise Unauthorized(f"the API key '{record.id}' expired on {record.expires.isoformat()}; ask for a new one")
        return caller

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < 1.0:
            return
        self._checked = now
        if self._file_stamp() != self._stamp:
            try:
                self._read()
            except SettingsFileError:  # a half-written or broken edit: keep serving the keys we had
                pass

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path) if self.path is not None else None
        except OSError:
            return None
        return None if st is None else (st.st_mtime_ns, st.st_size)

    def _read(self) -> None:
        self._checked = time.monotonic()
        if self.path is None:
            return
        stamp = self._file_stamp()
        records = read_keys(self.path) if stamp is not None else []
        table: dict[str, tuple[KeyRecord, Caller]] = {}
        for index, record in enumerate(records):
            tier = self.tiers.tiers.get(record.tier)
            if tier is None:
                raise SettingsFileError(str(self.path), f"keys.{index}.tier", f"no tier '{record.tier}'",
                                        f"use one of {sorted(self.tiers.tiers)} or define it in tiers.yaml")  # fmt: skip
            table[record.sha256] = (record, Caller(record.id, tier, record.admin, record.tier))
        self._by_digest, self._stamp, self._seen = table, stamp, {}


def read_keys(path: Path) -> list[KeyRecord]:
    """keys.yaml's keys (an absent file holds none); SettingsFileError names the field that is wrong."""
    if not path.exists():
        return []
    doc = _read_yaml(path, _KeysFile, "keys.yaml")
    seen: set[str] = set()
    for index, record in enumerate(doc.keys):
        if record.id in seen:
            raise SettingsFileError(str(path), f"keys.{index}.id", f"'{record.id}' is used twice",
                                    "give each key its own id")  # fmt: skip
        seen.add(record.id)
    return doc.keys


def create_key(path: Path, tier: str, *, key_id: str | None = None, owner: str | None = None,
               expires: dt.date | None = None, admin: bool = False,
               tiers: Tiers | None = None) -> tuple[str, KeyRecord]:  # fmt: skip
    """A new secret and its record, appended to keys.yaml (written whole, then renamed into place).

    The secret is returned once and stored nowhere: only its SHA-256 goes into the file."""
    known = (tiers or Tiers.load(None)).tiers
    if tier not in known:
        raise SettingsFileError(str(path), "tier", f"no tier '{tier}'",
                                f"use one of {sorted(known)} or define it in tiers.yaml")  # fmt: skip
    records = read_keys(path)
    ids = {r.id for r in records}
    if key_id is None:
        key_id = next(f"{tier}-{n}" for n in range(1, len(records) + 2) if f"{tier}-{n}" not in ids)
    if key_id in ids:
        raise SettingsFileError(str(path), "id", f"a key '{key_id}' exists already", "pick another --id or revoke it first")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    try:
        record = KeyRecord(id=key_id, sha256=digest(secret), tier=tier, owner=owner, expires=expires, admin=admin)
    except ValidationError as exc:
        raise SettingsFileError(str(path), "id", exc.errors()[0]["msg"], "use letters, digits and . _ @ -") from None
    write_keys(path, [*records, record])
    return secret, record


def revoke_key(path: Path, key_id: str) -> KeyRecord:
    """Remove a key from keys.yaml; a running server refuses it within a second."""
    records = read_keys(path)
    kept = [r for r in records if r.id != key_id]
    if len(kept) == len(records):
        raise SettingsFileError(str(path), "id", f"no key '{key_id}'", f"use one of {[r.id for r in records]}")
    write_keys(path, kept)
    return next(r for r in records if r.id == key_id)


def write_keys(path: Path, records: list[KeyRecord]) -> None:
    """keys.yaml rewritten atomically (a reader sees the old file or the new one), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"keys": [r.model_dump(mode="json", exclude_defaults=True) | {"id": r.id, "sha256": r.sha256, "tier": r.tier}
                    for r in records]}  # fmt: skip
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keys-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("# API keys: only each secret's SHA-256 is kept (forwardpass keys create prints the secret once)\n")
            yaml.safe_dump(doc, out, sort_keys=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_yaml(path: Path, schema: type[_Schema], what: str) -> _Schema:
    """A settings file's YAML as data, then checked against ``schema``; errors name the file and the field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsFileError(str(path), "", f"cannot read it ({exc.strerror})", f"check the path of {what}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where, problem = yaml_problem(exc)
        raise SettingsFileError(str(path), where, f"not valid YAML: {problem}", "fix the YAML syntax there") from None
    raw = {} if raw is None else raw
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, (dict, list)) else f", got {got!r}"
        raise SettingsFileError(str(path), loc, f"{err['msg']}{shown}", f"correct it (see the {what} format in "
                                "forwardpass/monitoring/keys.py or the README)") from None  # fmt: skip
