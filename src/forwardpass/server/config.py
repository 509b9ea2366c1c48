"""Server settings: one typed model, filled from CLI options or FORWARDPASS_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    api_key: str | None = None  # when set, the OpenAI-compatible endpoints want "Authorization: Bearer <key>"

    @classmethod
    def from_env(cls, **overrides: object) -> ServeConfig:
        """Fields from FORWARDPASS_<FIELD> variables, then ``overrides`` (CLI options) on top."""
        values: dict[str, object] = {}
        for name in cls.model_fields:
            env = os.environ.get(f"FORWARDPASS_{name.upper()}")
            if env is not None:
                values[name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    def to_env(self) -> dict[str, str]:
        """The same settings as environment variables, for worker processes."""
        return {f"FORWARDPASS_{k.upper()}": str(v) for k, v in self.model_dump().items() if v is not None}
