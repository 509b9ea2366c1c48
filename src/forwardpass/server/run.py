"""Running the server under uvicorn (uvloop + httptools when installed), one process or several."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import uvicorn

from forwardpass.server.app import create_app
from forwardpass.server.config import ServeConfig


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM that drained cleanly exits with status 0.

    uvicorn re-raises the caught signal after its graceful shutdown, so the process would end
    with -15; for a server that finished every in-flight request that is not a failure.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def serve(config: ServeConfig, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM, then drain in-flight requests (up to config.drain_timeout) and return."""
    options: dict[str, Any] = {
        "host": config.host, "port": config.port, "log_level": log_level, "access_log": False,
        "lifespan": "on", "timeout_graceful_shutdown": config.drain_timeout,
        "loop": "uvloop" if _has("uvloop") else "asyncio", "http": "httptools" if _has("httptools") else "h11",
    }  # fmt: skip
    if config.workers > 1:  # worker processes build their own app from the environment
        os.environ.update(config.to_env())
        uvicorn.run("forwardpass.server.app:create_app_from_env", factory=True, workers=config.workers, **options)
        return
    _Server(uvicorn.Config(create_app(config), **options)).run()
