"""Deployment across machines: the inventory, remote stacks, `deploy`.

The network host runs the VPN server; each node or researcher host joins it:
genconf on the network host, the config carried to the peer host in memory
(0600, never printed), the peer started, its public key carried back and
added, a ping from the peer. Hosts that need nothing are left alone; node
hosts are handled in parallel.
"""

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from . import gui
from .errors import BadInput, EngineError, FbmVpnError
from .remote import RemoteHost
from .settings import PROJECT_ROOT, Identity, Settings
from .stack import Stack

ROLES = {
    "network": "vpnserver",
    "node": "node",
    "researcher": "researcher",
    "gui": "gui",
}
SINGLE_ROLES = ("network", "researcher")
RUN_FILES = ("docker-compose.yml", "gpu-devices.yml")


@dataclass(frozen=True)
class HostEntry:
    host: str
    role: str
    id: str = ""
    dir: str = ""

    @property
    def component(self) -> str:
        return ROLES[self.role]


def parse_inventory(entries, peers: dict) -> list[HostEntry]:
    """Check an inventory: known roles, one network and at most one researcher."""
    result, seen = [], {}
    for number, raw in enumerate(entries or [], 1):
        raw = dict(raw)
        host, role = str(raw.get("host") or ""), str(raw.get("role") or "")
        if not host:
            raise BadInput(f"inventory entry {number} has no host")
        if role not in ROLES:
            raise BadInput(
                f"inventory entry {number} ({host}): unknown role {role!r}; use one "
                f"of {', '.join(ROLES)}"
            )
        if role in SINGLE_ROLES and role in seen:
            raise BadInput(
                f"the inventory names role {role} twice ({seen[role]} and {host}); "
                f"keep one"
            )
        seen.setdefault(role, host)
        default_id = peers.get(ROLES[role], "") if role != "node" else _host_id(host)
        result.append(
            HostEntry(
                host, role, str(raw.get("id") or default_id), str(raw.get("dir") or "")
            )
        )
    ids = [e.id for e in result if e.role == "node"]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise BadInput(
            f"node id {duplicates[0]} is used by two node hosts; give each an `id`"
        )
    if "network" not in seen:
        raise BadInput("the inventory has no network host (role: network)")
    return result


def _host_id(host: str) -> str:
    """A peer id from a host string: user@name:port -> name."""
    name = host.split("@")[-1].rsplit(":", 1)[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name).strip(".-") or "node"


def secure(conn, accept_new_host: bool):
    """Check host keys against known_hosts; accept an unknown key only if asked."""
    import paramiko

    conn.client.load_system_host_keys()
    policy = paramiko.AutoAddPolicy() if accept_new_host else paramiko.RejectPolicy()
    conn.client.set_missing_host_key_policy(policy)
    return conn


def remote_stack(conn, fbm, say=print, base_dir: str = "") -> Stack:
    """A Stack on the machine behind a Fabric Connection."""
    host = RemoteHost(secure(conn, bool(fbm["remote"]["accept_new_host"])))
    host.open()
    settings = Settings.from_config(fbm)
    base = PurePosixPath(base_dir or fbm["remote"]["dir"])
    if not base.is_absolute():
        base = host.home() / base
    identity = settings.identity
    if fbm["identity"]["uid"] is None:
        out = host.probe(["sh", "-c", "id -u; id -g; id -un; id -gn"]).stdout.split()
        identity = Identity(int(out[0]), int(out[1]), out[2], out[3])
        identity = replace(
            identity, user=_clean(identity.user), group=_clean(identity.group)
        )
    settings = replace(settings, compose_dir=base, mounts=base, identity=identity)
    return Stack(host, settings, say=lambda text: say(f"[{host.name}] {text}"))


def _clean(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name)


def sync_run_files(stack: Stack) -> None:
    """Put the compose files and their variables on a remote host."""
    local = PROJECT_ROOT / "envs" / "vpn" / "docker"
    for name in RUN_FILES:
        stack.host.write_text(
            stack.settings.compose_dir / name, (local / name).read_text(), 0o644
        )
    stack.write_compose_env()


def deploy(connect, fbm, entries, say=print, public_addr=None, ship=None) -> list[dict]:
    """Bring up the whole deployment described by `entries`.

    `connect(host_string)` returns a Fabric Connection; `ship(stack, image)`
    makes sure an image is on that host (the image transfer); returns the
    status rows of every host.
    """
    stacks = {}
    for entry in entries:
        stacks[entry] = remote_stack(connect(entry.host), fbm, say, entry.dir)
    for entry, stack in stacks.items():
        _step(entry, "checking Docker", stack.check_engine)

    network = next(e for e in entries if e.role == "network")
    server = stacks[network]

    def prepare(entry):
        stack = stacks[entry]
        sync_run_files(stack)
        if ship:
            _step(
                entry,
                "shipping images",
                lambda: ship(stack, stack.image(entry.component)),
            )

    _parallel(prepare, entries)

    def start_server():
        if not server.host.exists(server.server_config()):
            server.vpnserver_init(public_addr)
        server.up("vpnserver")

    _step(network, "starting the VPN server", start_server)

    def join(entry):
        if entry.role == "gui":
            _step(entry, "starting the GUI", lambda: gui.up(stacks[entry]))
        elif entry.role != "network":
            _step(
                entry,
                f"joining {entry.role} {entry.id}",
                lambda: stacks[entry].join(entry.component, entry.id, server=server),
            )

    researchers = [e for e in entries if e.role == "researcher"]
    _parallel(join, researchers)
    _parallel(join, [e for e in entries if e.role in ("node", "gui")])

    rows = []
    for entry, stack in stacks.items():
        for row in stack.status([entry.component]):
            rows.append({"host": entry.host, **row})
    return rows


def _step(entry: HostEntry, what: str, action):
    try:
        return action()
    except FbmVpnError as error:
        raise EngineError(
            f"{entry.host} ({entry.role}): {what} failed: {error}"
        ) from None


def _parallel(action, entries) -> None:
    if len(entries) <= 1:
        for entry in entries:
            action(entry)
        return
    with ThreadPoolExecutor(max_workers=min(4, len(entries))) as pool:
        for future in [pool.submit(action, entry) for entry in entries]:
            future.result()
