"""Real daemons standing for remote machines: an OpenSSH server and a second engine.

`start_sshd` runs Debian's sshd on 127.0.0.1 with host keys, a client key and
an authorized_keys file of its own (root, key only); `start_dockerd` runs a
second Docker engine ("node engine") with its own data root, exec root, socket
and bridge, so that an image on the build engine and one on the node engine are
really distinct. sshd's `SetEnv DOCKER_HOST=...` points the commands run over
SSH at the node engine.

The session fixtures below wrap them for pytest (tests/conftest.py imports
them); bench/transfer.py calls the functions directly. A missing tool makes the
fixture fail with what to install, never skip.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pytest

SSHD = "/usr/sbin/sshd"
NODE_BRIDGE = "fbmtest0"
NODE_BRIDGE_ADDRESS = "10.213.0.1/24"
# Networks the node engine creates (compose projects) stay out of the ranges the
# build engine hands out (172.17-31.x, 192.168.x).
NODE_ADDRESS_POOL = "base=10.214.0.0/16,size=24"


class MissingTool(RuntimeError):
    """A program the test daemons need is not installed."""


class DaemonFailed(RuntimeError):
    """A test daemon did not start; the message carries its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require(*programs: str) -> None:
    for program in programs:
        if not shutil.which(program) and not Path(program).is_file():
            raise MissingTool(
                f"{program} is not installed; run scripts/setup.sh --tests "
                "(openssh-server, openssh-client, docker.io, iproute2)"
            )


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(child) for child in path.read_text().split()]
    except FileNotFoundError:
        return []


def _stop(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class SshEndpoint(NamedTuple):
    """Where the test sshd listens and the files a client needs to reach it."""

    host: str
    port: int
    user: str
    key_path: Path
    known_hosts_path: Path

    @property
    def pid_file(self) -> Path:
        return self.key_path.parent / "sshd.pid"

    def connect(self, **kwargs):
        """A Fabric Connection that checks the host key against known_hosts."""
        from fabric import Connection
        from paramiko import RejectPolicy

        conn = Connection(
            self.host,
            user=self.user,
            port=self.port,
            connect_kwargs={
                "key_filename": str(self.key_path),
                "look_for_keys": False,
                "allow_agent": False,
            },
            connect_timeout=10,
            **kwargs,
        )
        conn.client.set_missing_host_key_policy(RejectPolicy())
        conn.client.load_host_keys(str(self.known_hosts_path))
        return conn

    def ssh_options(self) -> list[str]:
        """Options for the OpenSSH clients (ssh -p / scp -P come on top)."""
        return [
            "-i",
            str(self.key_path),
            "-o",
            f"UserKnownHostsFile={self.known_hosts_path}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
        ]

    def session_pids(self) -> list[int]:
        """The sshd processes serving the open connections (not the listener)."""
        found, todo = [], _children(int(self.pid_file.read_text()))
        while todo:
            pid = todo.pop()
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except FileNotFoundError:
                continue
            if name == "sshd":
                found.append(pid)
                todo.extend(_children(pid))
        return found

    def kill_sessions(self) -> int:
        """Cut every open SSH connection as a network failure would.

        Only sshd's own processes die; the commands they ran see their input
        end. Returns how many processes were killed.
        """
        pids = self.session_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)


class SshServer:
    """A running sshd; `stop()` ends it."""

    def __init__(self, endpoint: SshEndpoint, process: subprocess.Popen, log: Path):
        self.endpoint = endpoint
        self.process = process
        self.log = log

    def stop(self) -> None:
        _stop(self.process)


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
        check=True,
        capture_output=True,
    )


def start_sshd(workdir: Path, *, env: dict[str, str] | None = None) -> SshServer:
    """Start sshd on 127.0.0.1:<free port> for root, with keys under `workdir`.

    `env` goes to every session through SetEnv (e.g. DOCKER_HOST).
    """
    require(SSHD, "ssh-keygen")
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = workdir / "ssh_host_ed25519_key"
    client_key = workdir / "client_ed25519"
    for path in (host_key, client_key):
        for stale in (path, path.with_suffix(".pub")):
            stale.unlink(missing_ok=True)
    _keygen(host_key, "fbm-test-host")
    _keygen(client_key, "fbm-test-client")
    authorized = workdir / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)

    port = free_port()
    host_pub = host_key.with_suffix(".pub").read_text().split()
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")

    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {host_key}",
        f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "AllowUsers root",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "MaxSessions 32",
        "MaxStartups 64",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
    ]
    # A home of its own: the sessions then see a fresh machine's root account,
    # not this one's shell start-up files (Debian's bash reads ~/.bashrc on ssh).
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), **(env or {})}
    lines.append("SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()))
    config = workdir / "sshd_config"
    config.write_text("\n".join(lines) + "\n")

    # Debian's sshd refuses to start without its privilege separation directory.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    check = subprocess.run([SSHD, "-t", "-f", config], capture_output=True, text=True)
    if check.returncode:
        raise DaemonFailed(f"sshd rejects its test config: {check.stderr.strip()}")

    log = workdir / "sshd.log"
    process = subprocess.Popen(
        [SSHD, "-D", "-f", config, "-E", log],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = SshEndpoint("127.0.0.1", port, "root", client_key, known_hosts)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DaemonFailed(f"sshd exited at start:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-2.0"):
                    return SshServer(endpoint, process, log)
        except OSError:
            time.sleep(0.1)
    _stop(process)
    raise DaemonFailed(f"sshd did not answer on port {port}:\n{_tail(log)}")


class DockerEngine:
    """A second dockerd with its own state, socket and bridge; `stop()` ends it."""

    def __init__(self, root: Path, process: subprocess.Popen, bridge: str):
        self.root = root
        self.process = process
        self.bridge = bridge
        self.socket = root / "docker.sock"
        self.log = root / "dockerd.log"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def docker(self, *args: str, check: bool = True, timeout: float = 300):
        """Run the docker CLI against this engine."""
        return subprocess.run(
            ["docker", "-H", self.docker_host, *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def image_id(self, ref: str) -> str | None:
        done = self.docker("image", "inspect", "-f", "{{.Id}}", ref, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    def stop(self) -> None:
        _stop(self.process, timeout=60)
        # Whatever the engine left mounted under its root would block the removal.
        mounts = Path("/proc/mounts").read_text().splitlines()
        for line in reversed(mounts):
            point = line.split()[1]
            if point.startswith(str(self.root) + "/"):
                subprocess.run(["umount", "-l", point], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def start_dockerd(
    root: Path,
    *,
    bridge: str = NODE_BRIDGE,
    address: str = NODE_BRIDGE_ADDRESS,
    address_pool: str = NODE_ADDRESS_POOL,
) -> DockerEngine:
    """Start a second Docker engine whose whole state lives under `root`.

    It gets a bridge of its own (never --bridge=none: that deleted the first
    engine's docker0) and leaves iptables to the first engine.
    """
    require("dockerd", "docker", "ip")
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    for argv in (
        ["ip", "link", "add", bridge, "type", "bridge"],
        ["ip", "addr", "add", address, "dev", bridge],
        ["ip", "link", "set", bridge, "up"],
    ):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            raise DaemonFailed(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")

    engine_log = root / "dockerd.log"
    argv = [
        "dockerd",
        "--data-root",
        root / "data",
        "--exec-root",
        root / "exec",
        "--pidfile",
        root / "docker.pid",
        "-H",
        f"unix://{root / 'docker.sock'}",
        "--bridge",
        bridge,
        "--iptables=false",
        "--ip-masq=false",
        "--default-address-pool",
        address_pool,
        "--containerd-namespace",
        "fbmtest-node",
        "--containerd-plugins-namespace",
        "fbmtest-node-plugins",
    ]
    with open(engine_log, "wb") as log:
        process = subprocess.Popen(
            [str(arg) for arg in argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    engine = DockerEngine(root, process, bridge)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            engine.stop()
            raise DaemonFailed(
                f"the node dockerd exited at start:\n{_tail(engine_log)}"
            )
        if engine.socket.exists():
            done = engine.docker("version", "-f", "{{.Server.Version}}", check=False)
            if done.returncode == 0:
                return engine
        time.sleep(0.3)
    engine.stop()
    raise DaemonFailed(f"the node dockerd did not answer:\n{_tail(engine_log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _started(start, *args, **kwargs):
    try:
        return start(*args, **kwargs)
    except (MissingTool, DaemonFailed) as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1: (host, port, user, key_path, known_hosts_path).

    Commands run through it talk to this machine's own Docker engine.
    """
    server = _started(start_sshd, tmp_path_factory.mktemp("sshd"))
    yield server.endpoint
    server.stop()


@pytest.fixture(scope="session")
def node_engine(tmp_path_factory):
    """A second Docker engine standing for a node machine's (a `DockerEngine`)."""
    engine = _started(start_dockerd, tmp_path_factory.mktemp("node-engine"))
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def node_sshd(tmp_path_factory, node_engine):
    """A real sshd whose sessions talk to the node engine (SetEnv DOCKER_HOST)."""
    server = _started(
        start_sshd,
        tmp_path_factory.mktemp("node-sshd"),
        env={"DOCKER_HOST": node_engine.docker_host},
    )
    yield server.endpoint
    server.stop()
