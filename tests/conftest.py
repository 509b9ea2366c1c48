"""Shared fixtures: a demo repository built once per test session in a temporary FORWARDPASS_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fp_home(tmp_path_factory: pytest.TempPathFactory):
    """FORWARDPASS_HOME for the whole session (subprocesses inherit it)."""
    home = tmp_path_factory.mktemp("fp-home")
    old = os.environ.get("FORWARDPASS_HOME")
    os.environ["FORWARDPASS_HOME"] = str(home)
    os.environ.pop("FORWARDPASS_REPOSITORY", None)
    yield home
    if old is None:
        os.environ.pop("FORWARDPASS_HOME", None)
    else:
        os.environ["FORWARDPASS_HOME"] = old


@pytest.fixture(scope="session")
def demo_repo(fp_home: Path) -> Path:
    """The built-in demo repository, built once."""
    from forwardpass import demo

    return demo.repository()
