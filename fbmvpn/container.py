"""Entrypoint of the VPN containers (vpnserver, node, researcher).

Runs as root at container start:

1. makes sure the run-time account (CONTAINER_UID/GID/USER/GROUP) exists, and
   refuses one that clashes with an existing account;
2. brings up wg0: the kernel module when USE_WG_KERNEL_MOD=true and it works,
   otherwise Debian's userspace wireguard-go; the interface key and peers are
   kept in /config/wireguard/wg0.conf (0600), so a restart keeps both;
3. marks the container ready, then waits; on SIGTERM it takes wg0 down and
   exits 0 (the state on disk is always current, nothing is lost).

FBM_VPN_ROLE selects `server`, `client`, `gui` (no VPN; nginx and Fed-BioMed's
GUI, see fbmvpn.gui) or `none` (no VPN).
"""

import grp
import ipaddress
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import envfile, gui, keys, templates
from .errors import FbmVpnError, StateError
from .files import write_atomic
from .registry import Registry

CONFIG = Path(os.environ.get("FBM_VPN_CONFIG", "/config"))
READY = Path("/run/fbm-vpn/ready")
INTERFACE = "wg0"
MTU = "1420"
KEEPALIVE = 25
CLIENT_KEYS = (
    "VPN_IP",
    "VPN_SUBNET_PREFIX",
    "VPN_SERVER_ENDPOINT",
    "VPN_SERVER_ALLOWED_IPS",
    "VPN_SERVER_PUBLIC_KEY",
    "VPN_SERVER_PSK",
)


def log(message: str) -> None:
    print(f"[fbm-entrypoint] {message}", flush=True)


def sh(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, **kwargs)


# -- identity ----------------------------------------------------------------


def _lookup(getter, key):
    try:
        return getter(key)
    except KeyError:
        return None


def ensure_identity(uid: int, gid: int, user: str, group: str) -> None:
    """Create the run-time account, or check that the existing one matches."""
    by_name = _lookup(grp.getgrnam, group)
    by_id = _lookup(grp.getgrgid, gid)
    if by_name and by_name.gr_gid != gid:
        raise StateError(
            f"group {group!r} exists in the image with gid {by_name.gr_gid}, not "
            f"{gid}; set CONTAINER_GROUP to another name or CONTAINER_GID to "
            f"{by_name.gr_gid}"
        )
    if by_id and by_id.gr_name != group:
        raise StateError(
            f"gid {gid} belongs to group {by_id.gr_name!r} in the image, not "
            f"{group!r}; set CONTAINER_GROUP={by_id.gr_name} or another CONTAINER_GID"
        )
    if not by_name:
        sh("groupadd", "-g", str(gid), group)

    by_name = _lookup(pwd.getpwnam, user)
    by_id = _lookup(pwd.getpwuid, uid)
    if by_name and by_name.pw_uid != uid:
        raise StateError(
            f"user {user!r} exists in the image with uid {by_name.pw_uid}, not {uid}; "
            f"set CONTAINER_USER to another name or CONTAINER_UID to {by_name.pw_uid}"
        )
    if by_id and by_id.pw_name != user:
        raise StateError(
            f"uid {uid} belongs to user {by_id.pw_name!r} in the image, not {user!r}; "
            f"set CONTAINER_USER={by_id.pw_name} or another CONTAINER_UID"
        )
    if not by_name:
        sh("useradd", "-m", "-u", str(uid), "-g", str(gid), "-s", "/bin/bash", user)
    elif by_name.pw_gid != gid:
        sh("usermod", "-g", str(gid), user)


def chown_paths(uid: int, gid: int) -> None:
    """Give the run-time account the folders listed in FBM_USER_PATHS."""
    for name in os.environ.get("FBM_USER_PATHS", "").split():
        path = Path(name)
        if not path.exists():
            continue
        stat = path.stat()
        if (stat.st_uid, stat.st_gid) != (uid, gid):
            sh("chown", "-R", f"{uid}:{gid}", str(path))


# -- WireGuard ---------------------------------------------------------------


def server_setup() -> tuple[str, str]:
    """Return (address/prefix, wg0.conf path) for the server."""
    registry = Registry(CONFIG)
    settings = registry.settings()
    registry.server_public_key()  # creates the interface key on first start
    return f"{settings['VPN_IP']}/{settings['VPN_SUBNET_PREFIX']}", registry.wg_conf


def client_setup() -> tuple[str, Path, str]:
    """Render the client wg0.conf from config.env, keeping the interface key."""
    env_path = CONFIG / "config.env"
    try:
        values = envfile.load(env_path, CLIENT_KEYS)
    except StateError as error:
        raise StateError(
            f"{error}; copy this peer's config.env from the VPN server "
            f"(`invoke peer.join` does it)"
        ) from None
    conf = CONFIG / "wireguard" / "wg0.conf"
    private_key = None
    if conf.exists():
        match = re.search(r"^PrivateKey\s*=\s*(\S+)", conf.read_text(), re.M)
        private_key = match.group(1) if match else None
    text = templates.render(
        "wg0-client.conf.j2",
        private_key=private_key or keys.generate_private_key(),
        server_public_key=keys.check_key(values["VPN_SERVER_PUBLIC_KEY"]),
        psk=keys.check_key(values["VPN_SERVER_PSK"], "preshared key"),
        endpoint=values["VPN_SERVER_ENDPOINT"],
        allowed_ips=values["VPN_SERVER_ALLOWED_IPS"],
        keepalive=KEEPALIVE,
    )
    write_atomic(conf, text)
    address = ipaddress.ip_interface(
        f"{values['VPN_IP']}/{values['VPN_SUBNET_PREFIX']}"
    )
    server_ip = values.get("VPN_SERVER_IP") or str(address.network.network_address + 1)
    return str(address), conf, server_ip


def interface_up(address: str, conf: Path) -> subprocess.Popen | None:
    """Create wg0, load its config and address; return wireguard-go if used."""
    subprocess.run(["ip", "link", "del", INTERFACE], capture_output=True)
    process = None
    want_kernel = os.environ.get("USE_WG_KERNEL_MOD", "false").lower() == "true"
    kernel = want_kernel and (
        subprocess.run(
            ["ip", "link", "add", INTERFACE, "type", "wireguard"], capture_output=True
        ).returncode
        == 0
    )
    if not kernel:
        if want_kernel:
            log("kernel WireGuard unavailable; using userspace wireguard-go")
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
        if not Path("/dev/net/tun").exists():
            raise StateError(
                "/dev/net/tun is missing; start the container with "
                "`devices: [/dev/net/tun]` and `cap_add: [NET_ADMIN]`"
            )
        process = subprocess.Popen(["wireguard-go", "-f", INTERFACE], env=env)
        for _ in range(100):
            if Path(f"/sys/class/net/{INTERFACE}").exists():
                break
            if process.poll() is not None:
                raise StateError("wireguard-go exited at start; see the lines above")
            time.sleep(0.05)
    sh("wg", "setconf", INTERFACE, str(conf))
    sh("ip", "address", "add", address, "dev", INTERFACE)
    sh("ip", "link", "set", "dev", INTERFACE, "mtu", MTU, "up")
    log(f"{INTERFACE} up at {address} ({'kernel' if kernel else 'wireguard-go'})")
    return process


def interface_down(process: subprocess.Popen | None) -> None:
    subprocess.run(["ip", "link", "del", INTERFACE], capture_output=True)
    if process and process.poll() is None:
        process.terminate()
        process.wait(timeout=10)


# -- main --------------------------------------------------------------------


class Watchdog:
    """Keeps a client's tunnel alive across a restart of the server.

    When the server container restarts, the host's connection tracking may keep
    sending this client's packets to a path that no longer exists (docker's
    published UDP port). After two failed pings of the server, the client moves
    to a new source port, which opens a fresh path.
    """

    def __init__(self, server_ip: str, every: float = 10.0):
        self.server_ip = server_ip
        self.every = every
        self.next_check = time.monotonic() + every
        self.failures = 0

    def tick(self) -> None:
        if time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + self.every
        ping = subprocess.run(
            ["ping", "-c", "1", "-W", "3", self.server_ip], capture_output=True
        )
        self.failures = 0 if ping.returncode == 0 else self.failures + 1
        if self.failures >= 2:
            log(f"{self.server_ip} unreachable; moving to a new source port")
            subprocess.run(["wg", "set", INTERFACE, "listen-port", "0"], check=False)
            self.failures = 0


def identity_from_env() -> None:
    uid = int(os.environ["CONTAINER_UID"])
    gid = int(os.environ["CONTAINER_GID"])
    ensure_identity(
        uid, gid, os.environ["CONTAINER_USER"], os.environ["CONTAINER_GROUP"]
    )
    chown_paths(uid, gid)


def main(argv: list[str]) -> int:
    if argv == ["--identity-only"]:  # at image build time
        try:
            identity_from_env()
        except (FbmVpnError, KeyError, ValueError) as error:
            log(f"cannot set up the account: {error}")
            return 1
        return 0

    role = os.environ.get("FBM_VPN_ROLE", "client")
    READY.unlink(missing_ok=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    process = watchdog = service = None
    try:
        identity_from_env()
        if role == "server":
            process = interface_up(*server_setup())
        elif role == "client":
            address, conf, server_ip = client_setup()
            process = interface_up(address, conf)
            watchdog = Watchdog(server_ip)
        elif role == "gui":
            service = gui.Service.start()
    except (FbmVpnError, subprocess.CalledProcessError, KeyError, ValueError) as error:
        log(f"cannot start: {error}")
        interface_down(process)
        return 1

    READY.parent.mkdir(parents=True, exist_ok=True)
    READY.write_text(f"{role}\n")
    log("ready")
    while not stopping:
        if process and process.poll() is not None:
            log("wireguard-go stopped; exiting so the container restarts")
            return 1
        if watchdog:
            watchdog.tick()
        if service and not service.tick():
            log("nginx stopped; exiting so the container restarts")
            service.stop()
            return 1
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.5)
    log("stopping")
    READY.unlink(missing_ok=True)
    if service:
        service.stop()
    interface_down(process)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
