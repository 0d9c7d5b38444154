"""`fab deploy` through real sshd servers to two Docker engines.

The network and researcher "machines" are sshd sessions on this machine's
engine; the node "machine" is an sshd whose sessions talk to a second engine
(its own data root and bridge), so the node runs on a separate engine and
reaches the VPN server through the host's address, as across real machines.
Every step goes through SSH: the `fab` CLI is run as a subprocess.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from remote_fixtures import node_engine, node_sshd, sshd  # noqa: F401

pytestmark = pytest.mark.docker

INSTANCE = "rdep"
TAG = "rdep"
PORT = 51860


def host_string(endpoint):
    return f"{endpoint.user}@{endpoint.host}:{endpoint.port}"


@pytest.fixture(scope="module")
def fab_env(tmp_path_factory, sshd, node_sshd, node_engine):  # noqa: F811
    """A HOME whose ssh config and known_hosts reach both test sshd servers."""
    home = tmp_path_factory.mktemp("fab-home")
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700)
    known = sshd.known_hosts_path.read_text() + node_sshd.known_hosts_path.read_text()
    (ssh / "known_hosts").write_text(known)
    (ssh / "config").write_text(
        "Host 127.0.0.1\n"
        f"  IdentityFile {sshd.key_path}\n"
        f"  IdentityFile {node_sshd.key_path}\n"
        "  IdentitiesOnly yes\n"
    )
    work = tmp_path_factory.mktemp("remote-dirs")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("INVOKE_", "FABRIC_"))
    }
    base = os.environ.get("FBM_TEST_BASE_IMAGE", "fbm-local/debian:bookworm")
    for prefix in ("INVOKE", "FABRIC"):
        env.update(
            {
                f"{prefix}_FBM_INSTANCE": INSTANCE,
                f"{prefix}_FBM_TAG": TAG,
                f"{prefix}_FBM_VPN_PORT": str(PORT),
                f"{prefix}_FBM_RESEARCHER_JUPYTER_PORT": str(PORT + 1),
                f"{prefix}_FBM_RESEARCHER_TENSORBOARD_PORT": str(PORT + 2),
                f"{prefix}_FBM_BUILD_BASE_IMAGE": base,
                # VPN-only images: the node image without Fed-BioMed is 0.4 GB,
                # not 8.7; shipping and the handshake are what is tested here
                f"{prefix}_FBM_BUILD_FEDBIOMED": "0",
                f"{prefix}_FBM_REMOTE_DIR": str(work),
            }
        )
    env["HOME"] = str(home)

    yield {"env": env, "work": work}
    for endpoint_engine in (None, node_engine.docker_host):
        prefix = ["docker"] + (["-H", endpoint_engine] if endpoint_engine else [])
        names = subprocess.run(
            prefix + ["ps", "-aq", "--filter", f"name=-{INSTANCE}$"],
            capture_output=True,
            text=True,
        ).stdout.split()
        if names:
            subprocess.run(prefix + ["rm", "-f", *names], capture_output=True)


def run(argv, env, check=True):
    result = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )
    if check and result.returncode:
        raise AssertionError(
            f"{argv} exited {result.returncode}\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
    return result


def fab(fab_env, *args, check=True):
    return run([sys.executable, "-m", "fabric", *args], fab_env["env"], check)


def test_deploy_across_three_hosts(fab_env, sshd, node_sshd, node_engine):  # noqa: F811
    hosts = [
        "--network", host_string(sshd),
        "--nodes", host_string(node_sshd),
        "--researcher", host_string(sshd),
    ]  # fmt: skip

    first = fab(fab_env, "deploy", *hosts, "--json")
    rows = json.loads(first.stdout)

    # The node image was built here and shipped to the node engine.
    assert "fedbiomed/vpn-node:rdep" in first.stderr
    node_image = subprocess.run(
        ["docker", "-H", node_engine.docker_host, "image", "inspect", "-f", "{{.Id}}",
         f"fedbiomed/vpn-node:{TAG}"],
        capture_output=True, text=True,
    )  # fmt: skip
    local_image = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Id}}", f"fedbiomed/vpn-node:{TAG}"],
        capture_output=True,
        text=True,
    )
    assert node_image.stdout == local_image.stdout != ""

    by_component = {r["component"]: r for r in rows}
    assert by_component["vpnserver"]["state"] == "running"
    assert by_component["node"]["ping_server"] is True
    assert by_component["node"]["vpn_ip"] == "10.221.0.2"
    assert by_component["researcher"]["ping_server"] is True

    # The node runs on the second engine, not on this machine's.
    node_ps = subprocess.run(
        ["docker", "ps", "--filter", f"name=fedbiomed-vpn-node-{INSTANCE}", "-q"],
        capture_output=True,
        text=True,
    )
    assert node_ps.stdout.strip() == ""

    # The config crossed machines without being printed.
    psk_line = next(
        line
        for line in (fab_env["work"] / "node/run_mounts/config/config.env")
        .read_text()
        .splitlines()
        if line.startswith("VPN_SERVER_PSK=")
    )
    assert psk_line.split("=", 1)[1] not in first.stdout + first.stderr

    again = fab(fab_env, "deploy", *hosts)
    assert "generated" not in again.stdout
    assert "deployment up on every host" in again.stdout


def test_one_task_on_one_host_with_dash_h(fab_env, node_sshd):  # noqa: F811
    status = fab(fab_env, "-H", host_string(node_sshd), "status", "--json", check=False)
    rows = {r["component"]: r for r in json.loads(status.stdout)}
    assert rows["node"]["state"] == "running"
    assert rows["vpnserver"]["state"] == "absent"  # not on the node machine


def test_refused_connection_is_a_clear_error(fab_env):
    result = fab(fab_env, "deploy", "--network", "root@127.0.0.1:1", check=False)
    assert result.returncode == 1
    assert "cannot reach 127.0.0.1:1 over SSH" in result.stderr
    assert "sshd runs there" in result.stderr


def test_unknown_host_key_is_refused(fab_env, sshd):  # noqa: F811
    env = dict(fab_env["env"])
    home = fab_env["work"] / "home-without-known-hosts"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    ssh_config = Path(fab_env["env"]["HOME"]) / ".ssh" / "config"
    (home / ".ssh" / "config").write_text(ssh_config.read_text())
    env["HOME"] = str(home)
    result = run(
        [sys.executable, "-m", "fabric", "deploy", "--network", host_string(sshd)],
        env,
        check=False,
    )
    assert result.returncode == 1
    assert "not in known_hosts" in result.stderr


def test_inventory_naming_a_role_twice_is_refused(fab_env, sshd):  # noqa: F811
    result = fab(
        fab_env,
        "deploy",
        "--network", host_string(sshd),
        "--researcher", host_string(sshd),
        "--nodes", "root@127.0.0.1:1,root@127.0.0.1:1",
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "used by two node hosts" in result.stderr


def test_image_push_to_a_host_that_has_it_sends_nothing(fab_env, node_sshd):  # noqa: F811
    result = fab(
        fab_env, "-H", host_string(node_sshd), "image.push", "--images", "node"
    )
    assert "already there" in result.stdout
    assert "nothing sent" in result.stdout


def test_via_file_bundle_carries_no_keys(fab_env, node_sshd, tmp_path):  # noqa: F811
    """The manual's two files; key material left in run_mounts stays behind."""
    mounts = tmp_path / "build-mounts"
    config = mounts / "node/run_mounts/config"
    (config / "wireguard").mkdir(parents=True)
    (config / "config.env").write_text("VPN_SERVER_PSK=secret-of-the-build-machine\n")
    (config / "wireguard/wg0.conf").write_text("[Interface]\nPrivateKey = x\n")
    (mounts / "node/run_mounts/data").mkdir()
    (mounts / "node/run_mounts/data/dataset.csv").write_text("a,b\n1,2\n")
    env = {**fab_env["env"], "FABRIC_FBM_MOUNTS": str(mounts)}
    out = tmp_path / "bundle"
    base = fab_env["work"] / "unpacked"

    result = run(
        [sys.executable, "-m", "fabric", "-H", host_string(node_sshd), "image.push",
         "--images", "node", "--via-file", str(out), "--base-dir", str(base)],
        env,
    )  # fmt: skip

    assert (out / "vpn-node-image.tar.gz").stat().st_size > 1_000_000
    assert (out / "vpn-node-files.tar.gz").exists()
    assert "vpn-node:" + TAG in (base / "docker-compose.yml").read_text()
    assert (base / "node/run_mounts/data/dataset.csv").read_text() == "a,b\n1,2\n"
    assert not (base / "node/run_mounts/config/config.env").exists()
    assert not (base / "node/run_mounts/config/wireguard/wg0.conf").exists()
    said = result.stdout + result.stderr
    assert "config.env" in said and "wg0.conf" in said
    assert "secret-of-the-build-machine" not in said
