"""Preflight of the tasks: no Docker engine, no Compose v2 (real commands).

Fake `docker` / `docker-compose` programs on PATH replay what the real ones
print in those situations; the checks run them through a real Invoke context.
"""

import os
import subprocess
import sys

import pytest
from invoke import Config, Context

from conftest import REPO_ROOT
from fbmvpn.errors import EngineError
from fbmvpn.host import LocalHost
from fbmvpn.settings import DEFAULTS, Settings
from fbmvpn.stack import Stack

DAEMON_DOWN = (
    "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
    "Is the docker daemon running?"
)


def fake(bin_dir, name, script):
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("sh", "cat", "echo"):
        os.symlink(
            subprocess.check_output(
                ["sh", "-c", f"command -v {tool}"], text=True
            ).strip(),
            folder / tool,
        )
    monkeypatch.setenv("PATH", str(folder))
    return folder


def stack():
    ctx = Context(Config(overrides={"run": {"in_stream": False}}))
    return Stack(LocalHost(ctx), Settings.from_config(DEFAULTS), say=lambda _: None)


def test_no_docker_command(bin_dir):
    with pytest.raises(EngineError, match="docker command is not installed"):
        stack().check_engine()


def test_engine_not_running(bin_dir):
    fake(bin_dir, "docker", f'echo "{DAEMON_DOWN}" >&2; exit 1\n')
    with pytest.raises(EngineError) as raised:
        stack().check_engine()
    assert "no Docker engine answers" in str(raised.value)
    assert "Is the docker daemon running?" in str(raised.value)
    assert "systemctl start docker" in str(raised.value)


def test_compose_v1_only(bin_dir):
    fake(
        bin_dir,
        "docker",
        'if [ "$1" = version ]; then echo 20.10.24; exit 0; fi\n'
        "echo \"docker: 'compose' is not a docker command.\" >&2; exit 1\n",
    )
    fake(
        bin_dir,
        "docker-compose",
        'echo "docker-compose version 1.29.2, build 5becea4c"\n',
    )
    with pytest.raises(EngineError) as raised:
        stack().check_engine()
    assert "Docker Compose v2 (`docker compose`) is required" in str(raised.value)
    assert "found docker-compose version 1.29.2" in str(raised.value)
    assert "docker-compose-plugin" in str(raised.value)


def test_engine_and_compose_v2_pass(bin_dir):
    fake(
        bin_dir,
        "docker",
        'if [ "$1" = version ]; then echo 20.10.24; exit 0; fi\n'
        'if [ "$1" = compose ]; then echo 2.40.3; exit 0; fi\nexit 1\n',
    )
    stack().check_engine()


def test_up_task_says_which_step_failed(bin_dir):
    fake(bin_dir, "docker", f'echo "{DAEMON_DOWN}" >&2; exit 1\n')
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "up"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bin_dir}"},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("checking Docker failed: no Docker engine answers")
