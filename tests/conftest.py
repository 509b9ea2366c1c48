"""Shared fixtures: a demo repository built once per test session in a temporary FORWARDPASS_HOME.

Importing fixtures registers the fake runtimes (echo, slow, failing, nan) before any model.yaml is read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fixtures  # noqa: F401  (registers the fake runtimes)
import pytest

if TYPE_CHECKING:
    from fixtures.inprocess import InProcess


@pytest.fixture(scope="session", autouse=True)
def fp_home(tmp_path_factory: pytest.TempPathFactory):
    """FORWARDPASS_HOME for the whole session (subprocesses inherit it), for every test: nothing a test runs
    writes into the user's own folder (the demo, usage.sqlite, keys.yaml)."""
    home = tmp_path_factory.mktemp("fp-home")
    old = os.environ.get("FORWARDPASS_HOME")
    os.environ["FORWARDPASS_HOME"] = str(home)
    from forwardpass.server.config import ServeConfig

    for name in ServeConfig.model_fields:  # a developer's exported serve settings must not reach test servers
        os.environ.pop(f"FORWARDPASS_{name.upper()}", None)
    yield home
    if old is None:
        os.environ.pop("FORWARDPASS_HOME", None)
    else:
        os.environ["FORWARDPASS_HOME"] = old


@pytest.fixture(scope="session")
def demo_build(fp_home: Path) -> subprocess.CompletedProcess[str]:
    """The demo repository built once per session by the command a user runs first, ``forwardpass demo``, in
    the session's empty FORWARDPASS_HOME: its output is what a first run prints (tests/unit/test_first_minutes.py)."""
    done = subprocess.run([sys.executable, "-m", "forwardpass", "demo"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FORWARDPASS_HOME": str(fp_home)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="session")
def demo_repo(demo_build: subprocess.CompletedProcess[str], fp_home: Path) -> Path:
    """The built-in demo repository, built once (by demo_build)."""
    from forwardpass import demo

    return demo.repository()


@pytest.fixture
def serve() -> Iterator[Callable[..., InProcess]]:
    """``serve(repository, **ServeConfig fields)``: the app in this process, started; stopped after the test."""
    from fixtures.inprocess import InProcess

    from forwardpass.server.config import ServeConfig

    started: list[InProcess] = []

    def start(repository: Path, **settings: Any) -> InProcess:
        app = InProcess(ServeConfig(repository=repository, **{"poll_interval": 0, **settings}))
        started.append(app)
        return app

    yield start
    for app in reversed(started):
        app.close()


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``cli(*args)``: the console script's entry point (forwardpass.cli.main) in this process, with the exit
    code, stdout and stderr a subprocess would give, without starting an interpreter per call."""
    from forwardpass.cli import main

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        monkeypatch.setattr(sys, "argv", ["forwardpass", *args])
        capfd.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["forwardpass", *args], code, out, err)

    return run


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One local Ray cluster (2 CPUs) for every Ray test of the session: the batch engine joins a cluster
    that is already up instead of starting its own (several seconds each)."""
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
