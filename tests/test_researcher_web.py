"""The researcher's web tools: where Jupyter and tensorboard are published,
who can reach them, and the tasks that start them.

The first tests are pure logic, plus one refusal through the real CLI that
needs no engine. The `fedbiomed` ones deploy vpnserver + node + researcher
with `invoke up` in an instance of their own (rweb: own names, ports and
run_mounts) and remove it afterwards. Images use the `e2e` tag, like the other
docker tests; builds trust FBM_TEST_CA_BUNDLE (default: the host's bundle).
"""

import json
import re
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fbmvpn import fedbiomed
from fbmvpn.errors import BadInput
from fbmvpn.host import Outcome
from stack_env import Instance, docker, isolated_env, run_invoke

INSTANCE = "rweb"
VPN_PORT = "51893"
JUPYTER_PORT = 18893
TENSORBOARD_PORT = 16893
RESEARCHER_VPN_IP = "10.222.0.2"

e2e = pytest.mark.fedbiomed


# -- pure logic -----------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", " 127.0.0.1 "])
def test_loopback_needs_no_confirmation(host):
    assert fedbiomed.check_web_host(host, expose=False) == host.strip()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.10.7", "10.222.0.2"])
def test_other_addresses_need_expose(host):
    with pytest.raises(BadInput) as refused:
        fedbiomed.check_web_host(host, expose=False)
    message = str(refused.value)

    assert "--expose" in message and "Nothing was changed" in message
    assert "runs any code" in message and "token" in message
    assert fedbiomed.check_web_host(host, expose=True) == host


def test_refusal_names_the_setting_it_comes_from():
    with pytest.raises(BadInput, match="^fbm.researcher.host 0.0.0.0 would"):
        fedbiomed.check_web_host("0.0.0.0", False, source="fbm.researcher.host")


@pytest.mark.parametrize("host", ["localhost", "::1", "1.2.3", "", "0.0.0.0; id"])
def test_web_host_must_be_an_ipv4_address(host):
    with pytest.raises(BadInput, match="address"):
        fedbiomed.check_web_host(host, expose=True)


def test_parse_bindings():
    text = json.dumps(
        {
            "8888/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18893"}],
            "6006/tcp": [{"HostIp": "", "HostPort": "16893"}],
            "51820/udp": [{"HostIp": "0.0.0.0", "HostPort": "51820"}],
        }
    )
    assert fedbiomed.parse_bindings(text) == {
        8888: ("127.0.0.1", 18893),
        6006: ("0.0.0.0", 16893),
    }
    assert fedbiomed.parse_bindings("null") == {}
    assert fedbiomed.parse_bindings("") == {}


def test_parse_addresses():
    text = (
        "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n"
        "2: eth0    inet 172.17.5.9/16 brd 172.17.255.255 scope global eth0\n"
    )
    assert fedbiomed.parse_addresses(text) == ["127.0.0.1", "172.17.5.9"]


class FakeHost:
    """Answers `docker inspect` of the port bindings with a fixed text."""

    dry = False
    name = "local"

    def __init__(self, bindings):
        self.bindings = bindings

    def probe(self, argv):
        return Outcome(True, json.dumps(self.bindings), "", 0)


class FakeStack:
    def __init__(self, bindings):
        self.host = FakeHost(bindings)
        self.settings = {
            "researcher": {
                "host": "127.0.0.1",
                "jupyter_port": 1,
                "tensorboard_port": 2,
            }
        }

    def container(self, name):
        return f"fedbiomed-vpn-{name}-test"


def _bindings(host):
    return {
        "8888/tcp": [{"HostIp": host, "HostPort": "18893"}],
        "6006/tcp": [{"HostIp": host, "HostPort": "16893"}],
    }


def test_url_and_warning_follow_the_container_binding():
    local = FakeStack(_bindings("127.0.0.1"))
    everywhere = FakeStack(_bindings("0.0.0.0"))
    lan = FakeStack(_bindings("192.168.10.7"))

    assert fedbiomed.web_url(local, 8888, "tree") == "http://127.0.0.1:18893/tree"
    assert fedbiomed.exposure_warning(local) is None
    assert fedbiomed.web_url(everywhere, 6006) == "http://127.0.0.1:16893/"
    assert "every address of this machine" in fedbiomed.exposure_warning(everywhere)
    assert fedbiomed.web_url(lan, 6006) == "http://192.168.10.7:16893/"
    assert "192.168.10.7" in fedbiomed.exposure_warning(lan)


def test_url_falls_back_to_the_settings_without_a_container():
    stack = FakeStack({})
    assert fedbiomed.web_url(stack, 8888) == "http://127.0.0.1:1/"


PORTS = dict(vpn=VPN_PORT, jupyter=JUPYTER_PORT, tensorboard=TENSORBOARD_PORT)


@pytest.mark.parametrize(
    "args, extra",
    [
        (["researcher.up", "--host", "0.0.0.0"], {}),
        (["researcher.jupyter", "--host", "192.0.2.7"], {}),
        (["researcher.tensorboard", "--host", "0.0.0.0"], {}),
        (["researcher.up"], {"INVOKE_FBM_RESEARCHER_HOST": "0.0.0.0"}),
    ],
)
def test_cli_refuses_before_touching_anything(tmp_path, args, extra):
    result = run_invoke(isolated_env(INSTANCE, tmp_path, PORTS, **extra), *args)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "--expose" in result.stderr and "Nothing was changed" in result.stderr
    assert "docker" not in result.stdout  # no command was run
    assert list(tmp_path.iterdir()) == []  # not even the compose env file


# -- the real thing ---------------------------------------------------------------


def host_address() -> str:
    """This machine's address on its default route (eth0 here)."""
    route = subprocess.run(
        ["ip", "-4", "route", "get", "192.0.2.255"], capture_output=True, text=True
    ).stdout.split()
    return route[route.index("src") + 1]


class Deployment(Instance):
    def __init__(self, mounts: Path):
        super().__init__(INSTANCE, mounts, PORTS)
        self.researcher = self.container("researcher")
        self.node = self.container("node")

    def container_id(self) -> str:
        return docker("inspect", "-f", "{{.Id}}", self.researcher).stdout.strip()

    def ports(self) -> list[str]:
        """`docker port` lines of the researcher, e.g. 8888/tcp -> 127.0.0.1:18893."""
        return sorted(docker("port", self.researcher).stdout.split("\n"))

    def published(self, port: int) -> set[str]:
        return set(docker("port", self.researcher, f"{port}/tcp").stdout.split())

    def from_node(self, address: str, port: int) -> str:
        """What a connection from the node to address:port meets."""
        probe = (
            "import socket, sys\n"
            "try:\n"
            "    socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)\n"
            "    print('open')\n"
            "except ConnectionRefusedError:\n"
            "    print('refused')\n"
            "except OSError as e:\n"
            "    print('error', e)\n"
        )
        argv = ["exec", self.node, "python3", "-c", probe, address, str(port)]
        return docker(*argv).stdout.strip()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=15) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def jupyter_url(output: str) -> str:
    urls = re.findall(r"^Jupyter: (\S+)$", output, re.M)
    assert len(urls) == 1, output
    return urls[0]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    info = docker("info", "--format", "{{.ServerVersion}}", check=False)
    assert info.returncode == 0, (
        f"no Docker engine: {info.stderr}; run scripts/setup.sh"
    )
    dep = Deployment(tmp_path_factory.mktemp("rweb-mounts"))
    try:
        dep.invoke("up", timeout=2400)
        yield dep
    finally:
        dep.invoke("clean", "all", "--level", "config", "--yes", check=False)
        label = f"label=com.docker.compose.project=fbm-vpn-{INSTANCE}"
        left = docker("ps", "-aq", "--filter", label).stdout.split()
        networks = docker("network", "ls", "-q", "--filter", label).stdout.split()
        assert not left, f"containers of instance {INSTANCE} remain: {left}"
        assert not networks, f"networks of instance {INSTANCE} remain: {networks}"


@e2e
@pytest.mark.parametrize(
    "task, host",
    [
        ("researcher.up", "0.0.0.0"),
        ("researcher.jupyter", "0.0.0.0"),
        ("researcher.tensorboard", "lan"),
    ],
)
def test_exposing_without_the_flag_changes_nothing(deployment, task, host):
    host = host_address() if host == "lan" else host
    before = (deployment.container_id(), deployment.ports())

    result = deployment.invoke(task, "--host", host, check=False)

    assert result.returncode == 1
    assert "--expose" in result.stderr and "runs any code" in result.stderr
    assert (deployment.container_id(), deployment.ports()) == before
    assert deployment.published(8888) == {f"127.0.0.1:{JUPYTER_PORT}"}


@e2e
def test_jupyter_token_once_private_and_required(deployment):
    first = deployment.invoke("researcher.jupyter")
    second = deployment.invoke("researcher.jupyter")

    url = jupyter_url(first.stdout)
    token = url.split("token=")[1]
    assert url.startswith(f"http://127.0.0.1:{JUPYTER_PORT}/tree?token=")
    assert first.stdout.count(token) == 1 and token not in first.stderr
    assert "runs already" in second.stdout and token not in second.stdout
    token_file = deployment.mounts / "researcher/run_mounts/fbm/researcher"
    mode = (token_file / ".jupyter-token").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    processes = docker("exec", deployment.researcher, "pgrep", "-af", ".").stdout
    assert "jupyter-notebook" in processes and token not in processes

    api = f"http://127.0.0.1:{JUPYTER_PORT}/api/contents"
    assert http_status(f"{api}?token={token}") == 200
    assert http_status(api) in (401, 403)
    assert http_status(f"{api}?token=not-{token}") in (401, 403)


# Writes one scalar where Fed-BioMed puts an experiment's tensorboard files.
SCALAR_SCRIPT = """
import os
from torch.utils.tensorboard import SummaryWriter
from fedbiomed.common.constants import TENSORBOARD_FOLDER_NAME
from fedbiomed.researcher.config import config

folder = os.path.join(config.vars["EXPERIMENTS_DIR"], "Experiment_rweb")
with SummaryWriter(os.path.join(folder, TENSORBOARD_FOLDER_NAME)) as writer:
    writer.add_scalar("loss", 0.5, 1)
print("wrote", folder)
"""


@e2e
def test_tensorboard_answers_and_runs_once(deployment):
    samples = deployment.mounts / "researcher" / "run_mounts" / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    (samples / "scalar.py").write_text(SCALAR_SCRIPT)
    deployment.invoke("researcher.run", "scalar.py")

    first = deployment.invoke("researcher.tensorboard")
    second = deployment.invoke("researcher.tensorboard")

    url = f"http://127.0.0.1:{TENSORBOARD_PORT}/"
    assert f"tensorboard: {url}" in first.stdout
    assert "/fbm/researcher/var/experiments" in first.stdout
    assert f"tensorboard runs already: {url}" in second.stdout
    assert http_status(url) == 200
    pattern = "--logdir /fbm/researcher/var/experiments"
    processes = docker("exec", deployment.researcher, "pgrep", "-fc", "--", pattern)
    assert processes.stdout.strip() == "1"
    deadline = time.monotonic() + 60
    runs = ""
    while "Experiment_rweb/runs" not in runs and time.monotonic() < deadline:
        time.sleep(2)
        with urllib.request.urlopen(f"{url}data/runs", timeout=15) as answer:
            runs = answer.read().decode()
    assert "Experiment_rweb/runs" in runs  # Fed-BioMed's experiment, seen


@e2e
def test_web_ports_closed_to_the_nodes_over_the_vpn(deployment):
    deployment.invoke("researcher.jupyter")
    deployment.invoke("researcher.tensorboard")

    ping = ["exec", deployment.node, "ping", "-c", "1", "-W", "2", RESEARCHER_VPN_IP]
    assert docker(*ping, check=False).returncode == 0
    # refused, not timed out: the packets reach the researcher, nothing listens
    assert deployment.from_node(RESEARCHER_VPN_IP, 8888) == "refused"
    assert deployment.from_node(RESEARCHER_VPN_IP, 6006) == "refused"
    with socket.create_connection(("127.0.0.1", JUPYTER_PORT), 5):
        pass
    with socket.create_connection(("127.0.0.1", TENSORBOARD_PORT), 5):
        pass


@e2e
def test_relative_run_paths_start_in_samples(deployment):
    samples = deployment.mounts / "researcher" / "run_mounts" / "samples"
    (samples / "mine").mkdir(parents=True, exist_ok=True)
    (samples / "mine" / "where.py").write_text("import os\nprint('cwd', os.getcwd())\n")

    listed = deployment.invoke("researcher.samples")
    ran = deployment.invoke("researcher.run", "mine/where.py")

    assert f"samples: {samples}" in listed.stdout
    assert "  mine/where.py" in listed.stdout
    assert "cwd /fbm/notebooks/samples/mine" in ran.stdout


@e2e
def test_expose_publishes_where_asked_and_keeps_the_state(deployment):
    lan = host_address()
    key = docker("exec", deployment.researcher, "wg", "show", "wg0", "public-key")
    before = deployment.container_id()

    moved = deployment.invoke("researcher.up", "--host", lan, "--expose")
    url = jupyter_url(deployment.invoke("researcher.jupyter").stdout)
    token = url.split("token=")[1]

    assert "recreating the container" in moved.stdout
    assert "warning:" in moved.stdout and lan in moved.stdout
    assert deployment.container_id() != before
    assert deployment.published(8888) == {f"{lan}:{JUPYTER_PORT}"}
    assert deployment.published(6006) == {f"{lan}:{TENSORBOARD_PORT}"}
    after = docker("exec", deployment.researcher, "wg", "show", "wg0", "public-key")
    assert after.stdout == key.stdout  # the VPN config survived
    marker = deployment.mounts / "researcher/run_mounts/fbm/researcher/.fedbiomed"
    assert marker.is_file()  # and the Fed-BioMed component
    assert url.startswith(f"http://{lan}:{JUPYTER_PORT}/tree?token=")
    assert http_status(f"http://{lan}:{JUPYTER_PORT}/api/contents") in (401, 403)
    api = f"http://{lan}:{JUPYTER_PORT}/api/contents?token={token}"
    assert http_status(api) == 200
    assert deployment.from_node(RESEARCHER_VPN_IP, 8888) == "refused"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", JUPYTER_PORT), 5)

    everywhere = deployment.invoke(
        "researcher.tensorboard", "--host", "0.0.0.0", "--expose"
    )
    assert "every address of this machine" in everywhere.stdout
    assert deployment.published(6006) == {f"0.0.0.0:{TENSORBOARD_PORT}"}
    assert http_status(f"http://127.0.0.1:{TENSORBOARD_PORT}/") == 200

    back = deployment.invoke("researcher.up")
    assert "instead of 0.0.0.0" in back.stdout and "warning:" not in back.stdout
    assert deployment.published(8888) == {f"127.0.0.1:{JUPYTER_PORT}"}
    status = deployment.invoke("status", "--json", check=False).stdout
    rows = {r["component"]: r for r in json.loads(status[status.index("[") :])}
    assert rows["researcher"]["ping_server"] is True
