"""Running the server: forwardpass's own HTTP/1.1 protocol on uvloop (default) or uvicorn, 1..N processes.

    serve(ServeConfig(repository="models", port=8000, workers=2))

Workers are forked after the listening socket is bound, so they share it; each loads the
repository itself and starts accepting only once its models are warm. SIGTERM or SIGINT:
stop accepting, finish in-flight requests (up to ``drain_timeout``), exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from forwardpass.server.app import App, create_app
from forwardpass.server.config import ServeConfig
from forwardpass.server.tenancy import prepare_state

log = logging.getLogger("forwardpass.server")


def serve(config: ServeConfig, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM, drain, return (the process then exits 0)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare_state(config)  # once, before any worker: every rate-limit bucket full, the usage file made
    if config.http == "uvicorn":
        _serve_uvicorn(config, log_level)
        return
    sock = listen(config.host, config.port)
    if config.workers == 1:
        run_worker(config, sock)
        return
    _supervise(config, sock)


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_worker(config: ServeConfig, sock: socket.socket) -> None:
    """Serve the app on ``sock`` with our own HTTP server until SIGINT or SIGTERM, then drain."""
    run_loop(worker(config, sock))


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """``main`` on a new event loop: uvloop's where it is installed."""
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


async def worker(config: ServeConfig, sock: socket.socket, make_app: Callable[[ServeConfig], App] = create_app) -> None:
    """One worker's life on the running loop: ``make_app(config)`` served on ``sock`` until SIGINT or SIGTERM."""
    from forwardpass.server.protocol import Listener

    started = time.monotonic()
    app = make_app(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    listener = Listener(app)
    await app.engine.start()
    app.start_publishing()
    await listener.serve(sock)
    host, port = sock.getsockname()[:2]
    log.info("forwardpass serving %s on http://%s:%d (pid %d; models loaded and warm in %.2f s)",
             app.engine.repository.path, host, port, os.getpid(), time.monotonic() - started)  # fmt: skip
    await stop.wait()
    log.info("shutting down: draining %d requests in progress", listener.state.active)
    if not await listener.drain(config.drain_timeout):
        log.warning("drain timeout: %d requests still in progress are dropped", listener.state.active)
    await app.stop_publishing()
    await app.engine.stop(config.drain_timeout)
    await asyncio.to_thread(app.close)
    listener.close()


def _supervise(config: ServeConfig, sock: socket.socket) -> None:
    """Fork the workers, forward SIGTERM/SIGINT to them, exit 0 when they all did."""
    children = []
    for _ in range(config.workers):
        pid = os.fork()
        if pid == 0:  # the child serves, then leaves without running the parent's cleanup
            code = 0
            try:
                run_worker(config, sock)
            except BaseException:
                log.exception("worker failed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children.append(pid)
    sock.close()

    def forward(sig: int, frame: Any) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    if failed:
        sys.exit(1)


def _uvicorn_server(config: Any) -> Any:
    """uvicorn's server, but a SIGTERM that drained cleanly exits with status 0 (uvicorn re-raises it)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                try:
                    yield
                finally:
                    captured = getattr(self, "_captured_signals", None)
                    if isinstance(captured, list):
                        captured.clear()

    return Server(config)


def _serve_uvicorn(config: ServeConfig, log_level: str) -> None:
    import uvicorn

    def has(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    options: dict[str, Any] = {
        "host": config.host, "port": config.port, "log_level": log_level, "access_log": False,
        "lifespan": "on", "timeout_graceful_shutdown": config.drain_timeout,
        # per-request work nobody here needs: X-Forwarded-* rewriting, Server and Date headers
        "proxy_headers": False, "server_header": False, "date_header": False,
        "timeout_keep_alive": config.keep_alive_timeout,
        "loop": "uvloop" if has("uvloop") else "asyncio", "http": "httptools" if has("httptools") else "h11",
        "ws": "websockets-sansio" if has("websockets") else "none",  # WebSocket streams (server/stream.py)
    }  # fmt: skip
    if config.workers > 1:  # worker processes build their own app from the environment
        os.environ.update(config.to_env())
        uvicorn.run("forwardpass.server.app:create_app_from_env", factory=True, workers=config.workers, **options)
        return
    _uvicorn_server(uvicorn.Config(create_app(config), **options)).run()
