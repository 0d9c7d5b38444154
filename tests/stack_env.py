"""A stack instance of the tests' own, driven through the real `invoke` CLI.

Each end-to-end module deploys under its own instance id, ports and run_mounts
folder, with the images of tag `e2e` (scripts/test.sh builds them once), so
modules never touch each other's containers or a user's stack.
"""

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

TAG = "e2e"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"

# keyword -> the setting each port goes to
PORT_SETTINGS = {
    "vpn": "INVOKE_FBM_VPN_PORT",
    "jupyter": "INVOKE_FBM_RESEARCHER_JUPYTER_PORT",
    "tensorboard": "INVOKE_FBM_RESEARCHER_TENSORBOARD_PORT",
    "gui_https": "INVOKE_FBM_GUI_HTTPS_PORT",
    "gui_http": "INVOKE_FBM_GUI_HTTP_PORT",
}


def docker(*args, check=True, timeout=300):
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def isolated_env(instance: str, mounts: Path, ports: dict, **extra) -> dict:
    """The caller's environment without its INVOKE_/FABRIC_ settings, plus the
    instance's own: names, ports, mounts, base image and, for pip behind an
    HTTPS proxy, FBM_TEST_CA_BUNDLE (default: the host's CA bundle)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("INVOKE_", "FABRIC_"))
    }
    ca = os.environ.get("FBM_TEST_CA_BUNDLE", HOST_CA)
    env.update(
        INVOKE_FBM_INSTANCE=instance,
        INVOKE_FBM_TAG=TAG,
        INVOKE_FBM_MOUNTS=str(mounts),
        INVOKE_FBM_BUILD_BASE_IMAGE=os.environ.get(
            "FBM_TEST_BASE_IMAGE", "fbm-local/debian:bookworm"
        ),
        INVOKE_FBM_BUILD_CA_BUNDLE=ca if Path(ca).is_file() else "",
    )
    env.update({PORT_SETTINGS[key]: str(port) for key, port in ports.items()})
    env.update(extra)
    return env


def run_invoke(env, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def require_engine() -> None:
    info = docker("info", "--format", "{{.ServerVersion}}", check=False)
    assert info.returncode == 0, (
        f"no Docker engine: {info.stderr}; run scripts/setup.sh"
    )


class Instance:
    """One deployment under test: `invoke` with its settings, its containers."""

    def __init__(self, instance: str, mounts: Path, ports: dict, **extra):
        self.instance = instance
        self.mounts = mounts
        self.env = isolated_env(instance, mounts, ports, **extra)

    def invoke(self, *args, check=True, timeout=900):
        result = run_invoke(self.env, *args, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"invoke {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
            )
        return result

    def container(self, name: str) -> str:
        return f"fedbiomed-vpn-{name}-{self.instance}"
