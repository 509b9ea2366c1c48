"""Real servers on free loopback ports: `python -m forwardpass serve` in a subprocess.

Readiness is polled on /v2/health/ready with a bound, never slept for.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import Server


@pytest.fixture
def repo_copy(demo_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the demo repository that a test may change."""
    target = tmp_path / "models"
    shutil.copytree(demo_repo, target)
    return target


@pytest.fixture(scope="module")
def server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server over a copy of the demo repository, shared by a test module."""
    target = tmp_path_factory.mktemp("srv") / "models"
    shutil.copytree(demo_repo, target)
    srv = Server(target)
    yield srv
    srv.stop()
