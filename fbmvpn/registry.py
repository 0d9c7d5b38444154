"""The VPN server's peer registry: configs, address assignment and keys.

All state lives under the server's config directory (`/config` in the container):

- `config.env`: the server settings (see templates/vpnserver-config.env.j2);
- `wireguard/wg0.conf`: the interface key and the registered peer keys, in the
  format `wg setconf` reads, each peer tagged with a `# fbm-peer TYPE ID` line;
- `config_peers/TYPE/ID/config.env`: what a peer needs to join (its address,
  the server's endpoint and public key, their preshared key);
- `ip_assign/last_ip_assign_TYPE`: the last address handed out in that range.

Every change happens under one lock and every file is replaced atomically, so
two shells running `genconf` at once never get the same address.
"""

import ipaddress
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import envfile, keys, templates
from .errors import BadInput, StateError
from .files import locked, write_atomic

PEER_TYPES = ("management", "node", "researcher")
LISTEN_PORT = 51820
SERVER_KEYS = (
    "VPN_SERVER_PUBLIC_ADDR",
    "VPN_SERVER_PORT",
    "VPN_IP",
    "VPN_SUBNET_PREFIX",
    "VPN_MANAGEMENT_IP_ASSIGN",
    "VPN_NODE_IP_ASSIGN",
    "VPN_RESEARCHER_IP_ASSIGN",
)
_PEER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TAG = re.compile(r"^#\s*fbm-peer\s+(\S+)\s+(\S+)\s*$")


def check_peer_type(peer_type: str) -> str:
    if peer_type not in PEER_TYPES:
        raise BadInput(
            f"unknown peer type {peer_type!r}; use one of: {', '.join(PEER_TYPES)}"
        )
    return peer_type


def check_peer_id(peer_id: str) -> str:
    if not _PEER_ID.fullmatch(peer_id or "") or ".." in peer_id:
        raise BadInput(
            f"peer id {peer_id!r} is not allowed; use 1 to 63 letters, digits, "
            f"'.', '_' or '-', starting with a letter or digit, without '..'"
        )
    return peer_id


@dataclass
class Peer:
    """One registered key of a peer, as written in wg0.conf."""

    peer_type: str
    peer_id: str
    public_key: str
    psk: str
    allowed_ips: str


@dataclass
class ServerConf:
    """The parsed wg0.conf of the server."""

    private_key: str
    listen_port: int = LISTEN_PORT
    peers: list[Peer] = field(default_factory=list)

    def render(self) -> str:
        return templates.render("wg0-server.conf.j2", **vars(self))

    @classmethod
    def parse(cls, text: str, source: str) -> "ServerConf":
        sections: list[tuple[str, dict[str, str], tuple[str, str] | None]] = []
        tag = None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if match := _TAG.match(line):
                tag = match.groups()
            elif not line or line.startswith("#"):
                continue
            elif line in ("[Interface]", "[Peer]"):
                sections.append((line, {}, tag))
                tag = None
            elif "=" in line and sections:
                key, value = (part.strip() for part in line.split("=", 1))
                sections[-1][1][key] = value
            else:
                raise StateError(f"{source}, line {number}: cannot read {line[:40]!r}")
        interfaces = [body for kind, body, _ in sections if kind == "[Interface]"]
        if len(interfaces) != 1 or "PrivateKey" not in interfaces[0]:
            raise StateError(f"{source} has no [Interface] with a PrivateKey")
        conf = cls(
            private_key=interfaces[0]["PrivateKey"],
            listen_port=int(interfaces[0].get("ListenPort", LISTEN_PORT)),
        )
        for kind, body, owner in sections:
            if kind != "[Peer]":
                continue
            if owner is None:
                raise StateError(
                    f"{source} has a [Peer] without its '# fbm-peer TYPE ID' line; "
                    f"add that line above it or remove the peer"
                )
            conf.peers.append(
                Peer(
                    peer_type=owner[0],
                    peer_id=owner[1],
                    public_key=body.get("PublicKey", ""),
                    psk=body.get("PresharedKey", ""),
                    allowed_ips=body.get("AllowedIPs", ""),
                )
            )
        return conf

    def keys_of(self, peer_type: str, peer_id: str) -> list[str]:
        return [
            p.public_key
            for p in self.peers
            if (p.peer_type, p.peer_id) == (peer_type, peer_id)
        ]


@dataclass
class PeerEntry:
    """A line of `list`: one peer config and the keys registered for it."""

    peer_type: str
    peer_id: str
    prefix: str
    keys: list[str]


class Registry:
    """The peer registry rooted at the server's config directory.

    `apply` is called with the path of wg0.conf after each change of keys, so the
    running interface can load it (the peer tool passes `wg syncconf`).
    """

    def __init__(self, root: Path, apply: Callable[[Path], None] | None = None):
        self.root = Path(root)
        self.apply = apply
        self.config_env = self.root / "config.env"
        self.wg_conf = self.root / "wireguard" / "wg0.conf"
        self.peers_dir = self.root / "config_peers"
        self.assign_dir = self.root / "ip_assign"
        self._lock = self.root / ".registry.lock"

    def settings(self) -> dict[str, str]:
        """The server settings from config.env, each value checked."""
        try:
            values = envfile.load(self.config_env, SERVER_KEYS)
        except StateError as error:
            raise StateError(
                f"{error}; run `invoke vpnserver.init` to write the server settings"
            ) from None
        for peer_type in PEER_TYPES:
            key = f"VPN_{peer_type.upper()}_IP_ASSIGN"
            _network(values[key], key)
        try:
            ipaddress.IPv4Interface(f"{values['VPN_IP']}/{values['VPN_SUBNET_PREFIX']}")
        except ValueError:
            raise StateError(
                f"VPN_IP={values['VPN_IP']!r} / VPN_SUBNET_PREFIX="
                f"{values['VPN_SUBNET_PREFIX']!r} in {self.config_env} is not an IPv4 "
                f"address and prefix such as 10.220.0.1 / 14"
            ) from None
        port = values["VPN_SERVER_PORT"]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise StateError(
                f"VPN_SERVER_PORT={port!r} in {self.config_env} is not a UDP port"
            )
        return values

    def load_server_conf(self) -> ServerConf | None:
        if not self.wg_conf.exists():
            return None
        return ServerConf.parse(self.wg_conf.read_text(), str(self.wg_conf))

    def server_public_key(self) -> str:
        """The server's public key; the interface key is made on first use."""
        with self.transaction() as tx:
            return keys.public_key(tx.conf.private_key)

    def peer_env(self, peer_type: str, peer_id: str) -> Path:
        return (
            self.peers_dir / check_peer_type(peer_type) / check_peer_id(peer_id)
        ) / "config.env"

    @contextmanager
    def transaction(self):
        """Hold the lock; stage every change and write it only if all succeed.

        Files are replaced one by one (each atomically) at the end, addresses
        first, so a crash can leave a gap in the assignment but never hand out an
        address twice; wg0.conf comes last and is applied once.
        """
        settings = self.settings()
        with locked(self._lock):
            tx = Transaction(self, settings)
            yield tx
            tx.commit()

    # One transaction per call; `batch` runs many verbs in one transaction.

    def genconf(self, peer_type: str, peer_id: str) -> Path:
        """Write the config.env of a new peer and return its path."""
        self.peer_env(peer_type, peer_id)
        with self.transaction() as tx:
            return tx.genconf(peer_type, peer_id)

    def add(self, peer_type: str, peer_id: str, public_key: str) -> bool:
        """Register a key for a generated peer; False if it held that key already."""
        self.peer_env(peer_type, peer_id)
        public_key = keys.check_key(public_key, "public key")
        with self.transaction() as tx:
            return tx.add(peer_type, peer_id, public_key)

    def remove(self, peer_type: str, peer_id: str) -> int:
        """Unregister every key of a peer, keeping its config; return how many."""
        self.peer_env(peer_type, peer_id)
        with self.transaction() as tx:
            return tx.remove(peer_type, peer_id)

    def removeconf(self, peer_type: str, peer_id: str) -> None:
        """Unregister every key of a peer and delete its config."""
        self.peer_env(peer_type, peer_id)
        with self.transaction() as tx:
            tx.removeconf(peer_type, peer_id)

    def show(self, peer_type: str, peer_id: str) -> str:
        """The config.env text of a peer (it holds the preshared key)."""
        path = self.peer_env(peer_type, peer_id)
        if not path.is_file():
            raise StateError(
                f"peer {peer_type} {peer_id} was never generated; "
                f"run `genconf {peer_type} {peer_id}` first"
            )
        return path.read_text()

    def entries(self) -> list[PeerEntry]:
        """Every peer config joined with the keys registered for it."""
        conf = self.load_server_conf()
        held: dict[tuple[str, str], list[str]] = {}
        for peer in conf.peers if conf else ():
            held.setdefault((peer.peer_type, peer.peer_id), []).append(peer.public_key)
        result = []
        for peer_type in PEER_TYPES:
            folder = self.peers_dir / peer_type
            if not folder.is_dir():
                continue
            for peer_dir in sorted(folder.iterdir()):
                env = peer_dir / "config.env"
                if not env.is_file():
                    continue
                ip = envfile.load(env).get("VPN_IP", "?")
                keys_held = held.get((peer_type, peer_dir.name), [])
                result.append(
                    PeerEntry(peer_type, peer_dir.name, f"{ip}/32", keys_held)
                )
        return result


class Transaction:
    """Changes staged under the registry lock, written by `commit`."""

    def __init__(self, registry: Registry, settings: dict[str, str]):
        self.registry = registry
        self.settings = settings
        conf = registry.load_server_conf()
        self._new_server_key = conf is None
        self.conf = conf or ServerConf(private_key=keys.generate_private_key())
        self._before = self.conf.render()
        self._ops: list[tuple[Path, tuple[str, int] | None]] = []
        self._highest: dict[str, ipaddress.IPv4Address] = {}

    # -- staged file view ----------------------------------------------------

    def _write(self, path: Path, text: str, mode: int = 0o600) -> None:
        self._ops.append((path, (text, mode)))

    def _delete_dir(self, path: Path) -> None:
        self._ops.append((path, None))

    def read(self, path: Path) -> str | None:
        """Content of `path` as the staged changes leave it; None if absent."""
        for target, op in reversed(self._ops):
            if op is None and path.is_relative_to(target):
                return None
            if op is not None and target == path:
                return op[0]
        return path.read_text() if path.is_file() else None

    def commit(self) -> None:
        for path, op in self._ops:
            if op is None:
                shutil.rmtree(path, ignore_errors=True)
            else:
                write_atomic(path, *op)
        after = self.conf.render()
        if after != self._before or self._new_server_key:
            write_atomic(self.registry.wg_conf, after)
            if self.registry.apply and after != self._before:
                self.registry.apply(self.registry.wg_conf)

    # -- verbs ---------------------------------------------------------------

    def genconf(self, peer_type: str, peer_id: str) -> Path:
        path = self.registry.peer_env(peer_type, peer_id)
        if self.read(path) is not None:
            raise StateError(
                f"peer {peer_type} {peer_id} has a configuration already ({path}); "
                f"use it as it is, or remove it first with `removeconf`"
            )
        settings = self.settings
        ip = self._next_ip(peer_type)
        server_ip = settings["VPN_IP"]
        prefix = settings["VPN_SUBNET_PREFIX"]
        text = templates.render(
            "peer-config.env.j2",
            peer_type=peer_type,
            peer_id=peer_id,
            ip=ip,
            prefix=prefix,
            endpoint=_endpoint(settings),
            allowed_ips=str(ipaddress.ip_network(f"{server_ip}/{prefix}", False)),
            server_public_key=keys.public_key(self.conf.private_key),
            psk=keys.generate_psk(),
            server_ip=server_ip,
        )
        # The address is recorded before the config that uses it.
        self._write(self._last_ip_file(peer_type), f"{ip}\n", 0o644)
        self._write(path, text)
        return path

    def add(self, peer_type: str, peer_id: str, public_key: str) -> bool:
        public_key = keys.check_key(public_key, "public key")
        if public_key == keys.public_key(self.conf.private_key):
            raise BadInput(
                "that is the VPN server's own public key; give the key of the peer "
                "(`wg show wg0 public-key` in the peer's container)"
            )
        path = self.registry.peer_env(peer_type, peer_id)
        text = self.read(path)
        if text is None:
            raise StateError(
                f"peer {peer_type} {peer_id} was never generated; "
                f"run `genconf {peer_type} {peer_id}` first"
            )
        for peer in self.conf.peers:
            if peer.public_key != public_key:
                continue
            if (peer.peer_type, peer.peer_id) == (peer_type, peer_id):
                return False
            raise StateError(
                f"this public key is registered for {peer.peer_type} {peer.peer_id} "
                f"already; a key belongs to one peer: remove it there first"
            )
        values = envfile.parse(text, str(path))
        missing = [k for k in ("VPN_IP", "VPN_SERVER_PSK") if not values.get(k)]
        if missing:
            raise StateError(
                f"{path} is incomplete ({', '.join(missing)} missing); recreate it "
                f"with `removeconf` then `genconf`"
            )
        self.conf.peers.append(
            Peer(
                peer_type=peer_type,
                peer_id=peer_id,
                public_key=public_key,
                psk=keys.check_key(
                    values["VPN_SERVER_PSK"],
                    "preshared key",
                    fix=f"the peer config {path} is damaged; recreate it with "
                    f"`removeconf` then `genconf`",
                ),
                allowed_ips=f"{values['VPN_IP']}/32",
            )
        )
        return True

    def remove(self, peer_type: str, peer_id: str) -> int:
        path = self.registry.peer_env(peer_type, peer_id)
        held = self.conf.keys_of(peer_type, peer_id)
        if not held and self.read(path) is None:
            raise StateError(f"no peer {peer_type} {peer_id} is known to this server")
        self.conf.peers = [
            p
            for p in self.conf.peers
            if (p.peer_type, p.peer_id) != (peer_type, peer_id)
        ]
        return len(held)

    def removeconf(self, peer_type: str, peer_id: str) -> None:
        self.remove(peer_type, peer_id)
        self._delete_dir(self.registry.peer_env(peer_type, peer_id).parent)

    # -- address assignment ----------------------------------------------------

    def _last_ip_file(self, peer_type: str) -> Path:
        return self.registry.assign_dir / f"last_ip_assign_{peer_type}"

    def _next_ip(self, peer_type: str) -> str:
        key = f"VPN_{peer_type.upper()}_IP_ASSIGN"
        network = _network(self.settings[key], key)
        last_file = self._last_ip_file(peer_type)
        text = self.read(last_file)
        if text is not None:
            text = text.strip()
            try:
                last = ipaddress.ip_address(text)
            except ValueError:
                last = None
            if last is None or last not in network:
                raise StateError(
                    f"{last_file} holds {text[:40]!r}, not an address of {network}; "
                    f"delete it and the next genconf resumes after the highest "
                    f"address already given to a {peer_type}"
                )
        # Never behind an address in use (a restored backup, a hand edit).
        last = max(
            [last] if text is not None else [],
            default=network.network_address + 1,
        )
        last = max(last, self._highest_assigned(peer_type, network))
        candidate = last + 1
        if candidate >= network.broadcast_address:
            raise StateError(
                f"no address left for {peer_type} peers in {network}; remove unused "
                f"peers with `removeconf` or widen {key} in "
                f"{self.registry.config_env}"
            )
        return str(candidate)

    def _highest_assigned(self, peer_type: str, network) -> ipaddress.IPv4Address:
        """The highest address held by a peer config of that type (read once)."""
        if peer_type not in self._highest:
            highest = network.network_address + 1
            folder = self.registry.peers_dir / peer_type
            for env in folder.glob("*/config.env") if folder.is_dir() else ():
                ip = envfile.load(env).get("VPN_IP")
                if ip and ipaddress.ip_address(ip) in network:
                    highest = max(highest, ipaddress.ip_address(ip))
            self._highest[peer_type] = highest
        return self._highest[peer_type]


def _network(text: str, key: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text)
    except ValueError:
        raise StateError(
            f"{key}={text!r} is not an IPv4 network such as 10.221.0.0/16"
        ) from None


def _endpoint(settings: dict[str, str]) -> str:
    """host:port as WireGuard reads it ([addr]:port for an IPv6 address)."""
    addr = settings["VPN_SERVER_PUBLIC_ADDR"]
    if ":" in addr:
        addr = f"[{addr}]"
    return f"{addr}:{settings['VPN_SERVER_PORT']}"
