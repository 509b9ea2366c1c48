"""A real `forwardpass serve` process on a free loopback port, for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `forwardpass serve` process."""

    def __init__(
        self, repository: Path, env: dict[str, str] | None = None, poll_interval: float = 0.0, args: tuple[str, ...] = (),
        ready_timeout: float = 30.0,
    ):
        self.repository = repository
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = repository.parent / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "forwardpass", "serve", str(repository), "--port", str(self.port),
               "--poll-interval", str(poll_interval), "--log-level", "warning", *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)  # fmt: skip
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
