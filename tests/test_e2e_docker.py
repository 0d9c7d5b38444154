"""Docker end-to-end: the real `invoke` CLI against a real engine.

Builds the images, deploys vpnserver + node + researcher in an instance of its
own (own names, ports and run_mounts), checks pings through the tunnel, runs
everything again, restarts containers, and feeds bad input to the peer tasks.
Needs a running Docker engine and Compose v2 (scripts/test.sh starts them);
without them these tests fail, they do not skip.
"""

import json
import re
import time

import pytest

from stack_env import Instance, docker, require_engine

pytestmark = pytest.mark.docker

INSTANCE = "e2e"
SOME_KEY = "te4DPqEe60e/6d1YwFIFOeELXDqFTwcSjE9U0DwxbBY="  # a valid, unused key
PORT = "51899"


class Deployment(Instance):
    def __init__(self, mounts):
        super().__init__(
            INSTANCE,
            mounts,
            dict(
                vpn=PORT,
                jupyter=18888,
                tensorboard=16006,
                gui_https=18443,
                gui_http=18484,
            ),
        )

    def wg_key(self, name):
        return docker("exec", self.container(name), "wg", "show", "wg0", "public-key")

    def peer_list(self):
        out = self.invoke("peer.list", "--json").stdout
        return json.loads(out[out.index("[") :])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    require_engine()
    dep = Deployment(tmp_path_factory.mktemp("mounts"))
    try:
        first = dep.invoke("up")
        dep.first_output = first.stdout
        yield dep
    finally:
        # containers, configs and this instance's networks; nothing else
        dep.invoke("clean", "all", "--level", "config", "--yes", check=False)


def test_up_reports_three_pings(deployment):
    out = deployment.first_output
    assert "ping node -> 10.220.0.1: OK" in out
    assert "ping researcher -> 10.220.0.1: OK" in out
    assert "ping node -> 10.222.0.2: OK" in out
    assert "deployment up: VPN verified" in out


def test_up_again_changes_nothing(deployment):
    keys_before = {n: deployment.wg_key(n).stdout for n in ("node", "researcher")}
    ids = {
        n: docker("inspect", "-f", "{{.Id}}", deployment.container(n)).stdout
        for n in ("vpnserver", "node", "researcher")
    }

    again = deployment.invoke("up")

    assert "generated" not in again.stdout
    assert "copied the config" not in again.stdout
    assert "deployment up: VPN verified" in again.stdout
    assert {n: deployment.wg_key(n).stdout for n in keys_before} == keys_before
    for name, container_id in ids.items():
        now = docker("inspect", "-f", "{{.Id}}", deployment.container(name))
        assert now.stdout == container_id, f"{name} was recreated"


def test_status_json_all_ok(deployment):
    status = deployment.invoke("status", "--json")
    rows = {r["component"]: r for r in json.loads(status.stdout)}
    assert rows["vpnserver"]["ok"] is True
    assert rows["node"]["vpn_ip"] == "10.221.0.2"
    assert rows["node"]["ping_server"] is True
    assert rows["node"]["ping_researcher"] is True
    assert rows["researcher"]["vpn_ip"] == "10.222.0.2"
    assert rows["node"]["handshake_age_s"] is not None
    assert rows["node2"]["state"] == "absent"


def test_peer_list_joins_configs_and_keys(deployment):
    peers = {(p["type"], p["id"]): p for p in deployment.peer_list()}
    node_key = deployment.wg_key("node").stdout.strip()
    assert peers[("node", "node1")]["keys"] == [node_key]
    assert peers[("node", "node1")]["prefix"] == "10.221.0.2/32"
    assert peers[("node", "node1")]["handshakes"][node_key] > 0


def test_restart_keeps_keys_ips_and_pings(deployment):
    keys_before = {n: deployment.wg_key(n).stdout for n in ("vpnserver", "node")}
    registry_before = registered(deployment.peer_list())

    docker("restart", deployment.container("vpnserver"))
    docker("restart", deployment.container("node"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = deployment.invoke("status", "--json", check=False)
        if status.returncode == 0:
            break
        time.sleep(2)

    assert status.returncode == 0, status.stdout + status.stderr
    assert {n: deployment.wg_key(n).stdout for n in keys_before} == keys_before
    rows = {r["component"]: r for r in json.loads(status.stdout)}
    assert rows["node"]["vpn_ip"] == "10.221.0.2"
    assert registered(deployment.peer_list()) == registry_before


def registered(peers):
    """What the registry holds, without the handshake times that move."""
    return [(p["type"], p["id"], p["prefix"], p["keys"]) for p in peers]


def test_stop_is_clean_and_state_saved(deployment):
    docker("stop", deployment.container("node"))
    logs = docker("logs", "--tail", "5", deployment.container("node")).stdout
    code = docker("inspect", "-f", "{{.State.ExitCode}}", deployment.container("node"))
    assert "stopping" in logs
    assert code.stdout.strip() == "0"
    deployment.invoke("node.up")
    status = json.loads(deployment.invoke("status", "--json", check=False).stdout)
    assert {r["component"]: r for r in status}["node"]["vpn_ip"] == "10.221.0.2"


# -- bad input through the real tasks --------------------------------------


def test_add_key_of_another_peer_is_refused(deployment):
    deployment.invoke("peer.genconf", "node", "other")
    before = deployment.peer_list()
    node_key = deployment.wg_key("node").stdout.strip()

    refused = deployment.invoke("peer.add", "node", "other", node_key, check=False)

    assert refused.returncode == 1
    assert "node node1" in refused.stderr
    assert deployment.peer_list() == before
    deployment.invoke("peer.removeconf", "node", "other")


@pytest.mark.parametrize(
    "args, message",
    [
        (("peer.genconf", "node", "a/b"), "not allowed"),
        (("peer.genconf", "node", ".."), "not allowed"),
        (("peer.genconf", "node", "has space"), "not allowed"),
        (("peer.genconf", "robot", "x"), "invalid choice"),
        (("peer.genconf", "node", "node1"), "has a configuration already"),
        (("peer.add", "node", "never-made", SOME_KEY), "never generated"),
        (("peer.add", "node", "node1", "not-a-key"), "not a WireGuard key"),
        (("peer.join", "gui"), "not a VPN peer"),
    ],
)
def test_bad_peer_input_is_refused_clearly(deployment, args, message):
    before = deployment.peer_list()

    result = deployment.invoke(*args, check=False)

    assert result.returncode == 1
    assert message in result.stderr
    assert deployment.peer_list() == before


def test_peer_task_when_vpnserver_is_down(deployment):
    docker("stop", deployment.container("vpnserver"))
    try:
        result = deployment.invoke("peer.list", check=False)
        assert result.returncode == 1
        assert "vpnserver container is not running" in result.stderr
        assert "invoke vpnserver.up" in result.stderr
    finally:
        deployment.invoke("vpnserver.up")


def test_server_restart_alone_heals_within_a_minute(deployment):
    """The clients' watchdog moves them past stale connection tracking."""
    docker("stop", deployment.container("vpnserver"))
    time.sleep(3)
    deployment.invoke("vpnserver.up")

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if deployment.invoke("status", "--json", check=False).returncode == 0:
            break
        time.sleep(3)

    assert deployment.invoke("status", "--json", check=False).returncode == 0


def test_status_names_the_broken_hop(deployment):
    docker("stop", deployment.container("researcher"))
    try:
        result = deployment.invoke("status", "--json", check=False)
        rows = {r["component"]: r for r in json.loads(result.stdout)}
        assert result.returncode == 1
        assert rows["node"]["ping_server"] is True
        assert rows["node"]["ping_researcher"] is False
        assert "node" in result.stderr
    finally:
        deployment.invoke("researcher.up")


def test_dry_run_prints_commands_and_changes_nothing(deployment):
    peers = deployment.peer_list()

    dry = deployment.invoke("--dry", "peer.genconf", "node", "dry-one")
    dry_up = deployment.invoke("--dry", "node.down")

    assert "configure_peer genconf node dry-one" in dry.stdout
    assert re.search(r"docker compose .* stop node node-gpu", dry_up.stdout)
    assert deployment.peer_list() == peers
    state = docker("inspect", "-f", "{{.State.Status}}", deployment.container("node"))
    assert state.stdout.strip() == "running"


def test_gpu_node_refused_cleanly_without_a_gpu(deployment):
    """No NVIDIA GPU here: node.up --gpu must explain and leave the stack alone."""
    before = docker("inspect", "-f", "{{.Id}}", deployment.container("node")).stdout

    result = deployment.invoke("node.up", "--gpu", check=False)

    assert result.returncode == 1
    assert "cannot run a GPU node; nothing was started or changed" in result.stderr
    assert "nvidia driver" in result.stderr.lower()
    assert "To fix:" in result.stderr
    after = docker(
        "inspect", "-f", "{{.Id}} {{.State.Status}}", deployment.container("node")
    )
    assert after.stdout.split() == [before.strip(), "running"]
    status = json.loads(deployment.invoke("status", "--json").stdout)
    node = {r["component"]: r for r in status}["node"]
    assert node["ping_server"] is True
    assert node["gpu"] is False


def test_runtime_identity_clash_is_refused(deployment):
    """A run-time UID that belongs to another account in the image."""
    image = f"fedbiomed/vpn-researcher:{INSTANCE}"
    result = docker(
        "run", "--rm", "-e", "CONTAINER_UID=0", "-e", "CONTAINER_USER=alice",
        "-e", "CONTAINER_GID=0", "-e", "CONTAINER_GROUP=root", "-e",
        "FBM_VPN_ROLE=none", image, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "uid 0 belongs to user 'root' in the image, not 'alice'" in result.stdout


def test_partial_config_env_is_named_at_start(deployment, tmp_path):
    """A client whose config.env lacks keys stops with the missing names."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "config.env").write_text("VPN_IP=10.221.0.9\n")
    result = docker(
        "run", "--rm", "--cap-add", "NET_ADMIN", "--device", "/dev/net/tun",
        "-v", f"{config}:/config", f"fedbiomed/vpn-node:{INSTANCE}", check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "is incomplete: VPN_SUBNET_PREFIX, VPN_SERVER_ENDPOINT" in result.stdout
    assert "invoke peer.join" in result.stdout
    assert not (config / "wireguard").exists()
