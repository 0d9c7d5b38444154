"""Checks of user input found by trying the tool as a new user."""

import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from fbmvpn import envfile, keys
from fbmvpn.errors import BadInput
from fbmvpn.registry import Registry
from fbmvpn.settings import DEFAULTS, Settings
from fbmvpn.stack import check_address


def test_ipv6_public_address_gives_a_bracketed_endpoint(server_config, tmp_path):
    server_config(tmp_path, public_addr="2001:db8::1")
    registry = Registry(tmp_path)

    path = registry.genconf("node", "n1")

    assert envfile.load(path)["VPN_SERVER_ENDPOINT"] == "[2001:db8::1]:51820"


def test_server_own_key_is_refused(server_root):
    registry = Registry(server_root)
    registry.genconf("node", "n1")
    own = keys.public_key(registry.load_server_conf().private_key)
    before = registry.wg_conf.read_bytes()

    with pytest.raises(BadInput, match="VPN server's own public key"):
        registry.add("node", "n1", own)

    assert registry.wg_conf.read_bytes() == before


def test_all_zero_key_is_refused():
    with pytest.raises(BadInput, match="not all zero"):
        keys.check_key("A" * 43 + "=")


@pytest.mark.parametrize(
    "address", ["0.0.0.0", "::", "999.1.1.1", "bad host!", "", "-lead.example"]
)
def test_unusable_public_addresses_are_refused(address):
    with pytest.raises(BadInput):
        check_address(address)


@pytest.mark.parametrize("address", ["203.0.113.7", "2001:db8::1", "vpn.example.org"])
def test_usable_public_addresses_pass(address):
    assert check_address(address) == address


@pytest.mark.parametrize("port", ["abc", "0", "70000", "-1"])
def test_bad_ports_are_refused(port):
    fbm = {**DEFAULTS, "vpn": {**DEFAULTS["vpn"], "port": port}}
    with pytest.raises(BadInput, match="fbm.vpn.port=.* is not a port number"):
        Settings.from_config(fbm)


def test_clean_refuses_a_bad_level_before_asking():
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "clean", "node", "--level", "everything"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert "unknown level 'everything'" in result.stderr
    assert "Delete" not in result.stdout + result.stderr


def test_shell_without_a_terminal_says_so():
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "node.shell"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    assert result.returncode == 1
    assert "needs a terminal" in result.stderr


def test_two_web_ports_on_one_number_are_refused():
    fbm = {
        **DEFAULTS,
        "researcher": {**DEFAULTS["researcher"], "jupyter_port": 6006},
    }
    with pytest.raises(
        BadInput,
        match="tensorboard_port and .*jupyter_port|jupyter_port and .*tensorboard_port",
    ):
        Settings.from_config(fbm)
