"""Server settings: one typed model, filled from CLI options or FORWARDPASS_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ServeConfig(BaseModel):
    """How `forwardpass serve` runs (every field has a FORWARDPASS_<NAME> variable)."""

    model_config = ConfigDict(extra="forbid")

    repository: Path | None = None  # None: the built-in demo repository
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    max_body_bytes: int = Field(64 * 2**20, ge=1)
    max_elements: int = Field(64 * 2**20, ge=1)  # per input tensor
    poll_interval: float = Field(2.0, ge=0)  # seconds between repository scans; 0 turns hot reload off
    cache_bytes: int = Field(64 * 2**20, ge=0)
    drain_timeout: float = Field(30.0, ge=0)  # seconds to finish in-flight requests on shutdown
    http: Literal["forwardpass", "uvicorn"] = "forwardpass"  # the HTTP/1.1 implementation (bench/serve.py)
    # Keys (server/auth.py): with any key set, every route but /v2/health/* needs one. Prefer the files:
    # a key on the command line is visible to every user of the machine in `ps`.
    api_key: str | None = None  # an inference key
    api_key_file: Path | None = None  # inference keys, one per line
    admin_key: str | None = None  # the key for repository control (load, unload, index)
    admin_key_file: Path | None = None
    public_metrics: bool = False  # /metrics without a key even when keys are on
    # Tenants (monitoring/, server/tenancy.py): keys with tiers, rate limits, quotas, metering
    keys_file: Path | None = None  # keys.yaml (default: $FORWARDPASS_HOME/keys.yaml when it exists)
    tiers_file: Path | None = None  # tiers.yaml: limits per tier, and prices (default: the built-in tiers)
    require_api_key: bool = False  # refuse requests without a key (always so with --api-key-file, or keys.yaml
    # on an address other than loopback)
    state_dir: Path | None = None  # usage.sqlite and the shared limits (default: $FORWARDPASS_HOME/state)
    metering: bool = True  # usage per key, model and day in state_dir/usage.sqlite
    usage_flush_interval: float = Field(1.0, gt=0)  # seconds between usage writes: what a SIGKILL may lose
    # Triton's model control modes: poll (load all, follow the folder), explicit (load only load_model,
    # then what the repository API asks), none (load all once; the repository API refuses changes)
    model_control: Literal["poll", "explicit", "none"] = "poll"
    load_model: list[str] = Field(default_factory=list)  # explicit mode: models loaded at start ("*": all)
    # connections (server/protocol.py; uvicorn takes keep_alive_timeout only)
    keep_alive_timeout: float = Field(5.0, gt=0)  # seconds an idle keep-alive connection stays open
    body_timeout: float = Field(30.0, gt=0)  # seconds a request may take to arrive, plus 1 s per body_min_rate bytes
    body_min_rate: int = Field(64 * 1024, ge=1)  # bytes/s a long upload must average to outlast body_timeout
    linger_timeout: float = Field(10.0, ge=0)  # seconds a closing error reply reads and drops the rest of the body

    @field_validator("load_model", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        return [n for n in value.split(",") if n] if isinstance(value, str) else value

    @classmethod
    def from_env(cls, **overrides: object) -> ServeConfig:
        """Fields from FORWARDPASS_<FIELD> variables, then ``overrides`` (CLI options) on top."""
        values: dict[str, object] = {}
        for name in cls.model_fields:
            env = os.environ.get(f"FORWARDPASS_{name.upper()}")
            if env is not None and not env.startswith("tcp://"):  # Kubernetes' service links, not our settings
                values[name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    def to_env(self) -> dict[str, str]:
        """The same settings as environment variables, for worker processes."""
        env = {}
        for k, v in self.model_dump().items():
            if v is not None:
                env[f"FORWARDPASS_{k.upper()}"] = ",".join(v) if isinstance(v, list) else str(v)
        return env
