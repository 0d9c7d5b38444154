"""The VPN server's peer tool, run inside the vpnserver container.

    configure_peer genconf TYPE ID        write the config of a new peer
    configure_peer add TYPE ID PUBKEY     register a key for it (several allowed)
    configure_peer remove TYPE ID         unregister its keys, keep its config
    configure_peer removeconf TYPE ID     unregister its keys and drop its config
    configure_peer list [--json]          configs joined with keys and handshakes
    configure_peer show TYPE ID           print a peer's config.env (a secret)
    configure_peer batch                  run one verb per stdin line, one lock

Exit status 0 on success, 1 with a one-line message on a refused request.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

from .errors import FbmVpnError
from .registry import PEER_TYPES, Registry

CONFIG_ROOT = Path(os.environ.get("FBM_VPN_CONFIG", "/config"))
INTERFACE = "wg0"


def _interface_up() -> bool:
    probe = subprocess.run(
        ["wg", "show", INTERFACE, "public-key"], capture_output=True, text=True
    )
    return probe.returncode == 0


def sync_interface(conf_path: Path) -> None:
    """Load wg0.conf into the running interface, if there is one."""
    if not _interface_up():
        return
    subprocess.run(["wg", "syncconf", INTERFACE, str(conf_path)], check=True)


def latest_handshakes() -> dict[str, int]:
    if not _interface_up():
        return {}
    out = subprocess.run(
        ["wg", "show", INTERFACE, "latest-handshakes"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pairs = (line.split("\t") for line in out.splitlines() if "\t" in line)
    return {key: int(stamp) for key, stamp in pairs}


def _age(stamp: int | None, now: float) -> str:
    if not stamp:
        return "never"
    return f"{int(now - stamp)}s ago"


def run_verb(registry: Registry, argv: list[str], conf=None) -> str:
    """Run one verb and return what it prints."""
    args = _parser().parse_args(argv)
    if args.verb == "genconf":
        path = registry.genconf(args.type, args.id, conf)
        return f"generated {args.type} {args.id}: {path}"
    if args.verb == "add":
        added = registry.add(args.type, args.id, args.pubkey, conf)
        state = "registered" if added else "was already registered"
        return f"key {state} for {args.type} {args.id}"
    if args.verb == "remove":
        count = registry.remove(args.type, args.id, conf)
        return f"removed {count} key(s) of {args.type} {args.id}; config kept"
    if args.verb == "removeconf":
        registry.removeconf(args.type, args.id, conf)
        return f"removed {args.type} {args.id} and its config"
    if args.verb == "show":
        return registry.peer_env(args.type, args.id).read_text().rstrip("\n")
    if args.verb == "pubkey":
        return registry.server_public_key()
    if args.verb == "list":
        return _list(registry, args.json)
    if args.verb == "batch":
        return _batch(registry)
    raise AssertionError(args.verb)


def _list(registry: Registry, as_json: bool) -> str:
    seen = latest_handshakes()
    now = time.time()
    rows = [
        {
            "type": e.peer_type,
            "id": e.peer_id,
            "prefix": e.prefix,
            "keys": e.keys,
            "handshakes": {key: seen.get(key, 0) for key in e.keys},
        }
        for e in registry.entries()
    ]
    if as_json:
        return json.dumps(rows, indent=1)
    table = [
        (
            r["type"],
            r["id"],
            r["prefix"],
            " ".join(r["keys"]) or "-",
            " ".join(_age(r["handshakes"][k], now) for k in r["keys"]) or "-",
        )
        for r in rows
    ]
    return tabulate(table, headers=("type", "id", "prefix", "keys", "handshake"))


def _batch(registry: Registry) -> str:
    """Run verbs read from stdin under one lock; stop at the first failure."""
    lines = [line for line in sys.stdin.read().splitlines() if line.strip()]
    done = 0
    with registry.transaction() as conf:
        for number, line in enumerate(lines, 1):
            argv = shlex.split(line)
            if not argv or argv[0] not in ("genconf", "add", "remove", "removeconf"):
                raise FbmVpnError(f"batch line {number}: unsupported verb in {line!r}")
            try:
                run_verb(registry, argv, conf)
            except FbmVpnError as error:
                raise FbmVpnError(
                    f"batch line {number} ({argv[0]}): {error}; "
                    f"{done} earlier line(s) were applied"
                ) from None
            done += 1
    return f"applied {done} line(s)"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise FbmVpnError(f"{message}; see `configure_peer --help`")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="configure_peer",
        description="Manage the peers of this WireGuard VPN server.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb, text in (
        ("genconf", "write the config of a new peer"),
        ("remove", "unregister every key of a peer, keep its config"),
        ("removeconf", "unregister every key of a peer and delete its config"),
        ("show", "print the config.env of a peer (it holds a secret)"),
        ("add", "register a public key for a generated peer"),
    ):
        sub = verbs.add_parser(verb, help=text)
        sub.add_argument("type", choices=PEER_TYPES, help="peer type")
        sub.add_argument("id", help="peer id, e.g. NODETAG")
        if verb == "add":
            sub.add_argument("pubkey", help="the peer's WireGuard public key")
    listing = verbs.add_parser("list", help="list peers, keys and last handshakes")
    listing.add_argument("--json", action="store_true", help="print JSON")
    verbs.add_parser("pubkey", help="print the server's public key")
    verbs.add_parser("batch", help="run genconf/add/remove lines read from stdin")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        _parser().print_help()
        return 0
    registry = Registry(CONFIG_ROOT, apply=sync_interface)
    try:
        print(run_verb(registry, argv))
    except FbmVpnError as error:
        print(f"configure_peer: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
