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

from . import keys
from .errors import EngineError, FbmVpnError
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
    result = subprocess.run(
        ["wg", "syncconf", INTERFACE, str(conf_path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise EngineError(
            f"{conf_path} is saved but `wg syncconf {INTERFACE}` failed "
            f"({result.stderr.strip()}); restart the vpnserver container to load it"
        )


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


MUTATING = ("genconf", "add", "remove", "removeconf")


def apply_verb(tx, args) -> str:
    """Stage one changing verb in a transaction; return what it prints."""
    if args.verb == "genconf":
        path = tx.registry.peer_env(args.type, args.id)
        if getattr(args, "reuse", False) and tx.read(path) is not None:
            message = f"{args.type} {args.id} exists; reused"
        else:
            path = tx.genconf(args.type, args.id)
            message = f"generated {args.type} {args.id}: {path}"
        if getattr(args, "print", False):
            # The config (a secret) goes to stdout for the caller to capture;
            # what happened goes to stderr.
            print(message, file=sys.stderr)
            return tx.read(path).rstrip("\n")
        return message
    if args.verb == "add":
        added = tx.add(args.type, args.id, args.pubkey)
        state = "registered" if added else "was already registered"
        return f"key {state} for {args.type} {args.id}"
    if args.verb == "remove":
        count = tx.remove(args.type, args.id)
        return f"removed {count} key(s) of {args.type} {args.id}; config kept"
    tx.removeconf(args.type, args.id)
    return f"removed {args.type} {args.id} and its config"


def run_verb(registry: Registry, argv: list[str]) -> str:
    """Run one verb and return what it prints."""
    args = _parser().parse_args(argv)
    if args.verb in MUTATING:
        registry.peer_env(args.type, args.id)  # refuse a bad id before any write
        if args.verb == "add":
            keys.check_key(args.pubkey, "public key")
        with registry.transaction() as tx:
            return apply_verb(tx, args)
    if args.verb == "show":
        return registry.show(args.type, args.id).rstrip("\n")
    if args.verb == "pubkey":
        return registry.server_public_key()
    if args.verb == "list":
        return _list(registry, args.json)
    return _batch(registry)


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
    headers = ("type", "id", "prefix", "keys", "handshake")
    return tabulate(table, headers=headers, disable_numparse=True)


def _batch(registry: Registry) -> str:
    """Run verbs read from stdin in one transaction: all of them, or none."""
    lines = sys.stdin.read().splitlines()
    done = 0
    with registry.transaction() as tx:
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            verb = ""
            try:
                argv = shlex.split(line)
                verb = argv[0] if argv else ""
                if verb not in MUTATING or any(a.startswith("-") for a in argv):
                    raise FbmVpnError(
                        f"unsupported verb or option: only {', '.join(MUTATING)} "
                        f"without options may be batched"
                    )
                apply_verb(tx, _parser().parse_args(argv))
            except (FbmVpnError, ValueError) as error:
                where = (
                    f"batch line {number} ({verb})" if verb else f"batch line {number}"
                )
                raise FbmVpnError(f"{where}: {error}; nothing was applied") from None
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
        if verb == "genconf":
            sub.add_argument(
                "--reuse", action="store_true", help="keep an existing config"
            )
            sub.add_argument(
                "--print",
                action="store_true",
                help="print the config (a secret) instead of a message",
            )
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
