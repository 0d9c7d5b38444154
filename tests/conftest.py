"""Shared fixtures: a rendered VPN server config and isolation from user config."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# `pytest` run without `python -m` does not put the repository on sys.path.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fbmvpn import templates  # noqa: E402

SERVER_SETTINGS = {
    "public_addr": "192.0.2.10",
    "port": 51820,
    "server_ip": "10.220.0.1",
    "prefix": 14,
    "assign": {
        "management": "10.220.0.0/16",
        "node": "10.221.0.0/16",
        "researcher": "10.222.0.0/16",
    },
    "kernel_module": False,
}


def write_server_config(root: Path, **overrides) -> Path:
    """Render templates/vpnserver-config.env.j2 into `root`/config.env."""
    values = {**SERVER_SETTINGS, **overrides}
    values["assign"] = {**SERVER_SETTINGS["assign"], **overrides.get("assign", {})}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.env"
    path.write_text(templates.render("vpnserver-config.env.j2", **values))
    return path


@pytest.fixture
def server_root(tmp_path):
    """A VPN server config directory holding only a rendered config.env."""
    write_server_config(tmp_path)
    return tmp_path


@pytest.fixture
def server_config():
    """Write a server config.env with some settings changed: f(root, **overrides)."""
    return write_server_config


@pytest.fixture(autouse=True)
def isolated_user_config(tmp_path_factory, monkeypatch):
    """Keep the machine's ~/.invoke.yaml, ~/.ssh/config and INVOKE_* out of tests."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for name in list(os.environ):
        if name.startswith(("INVOKE_", "FABRIC_")):
            monkeypatch.delenv(name)
    monkeypatch.delenv("FBM_VPN_CONFIG", raising=False)
    return home
