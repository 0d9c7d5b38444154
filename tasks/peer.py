"""VPN peers: the server's peer tool, and `join` for a component of this machine."""

import sys
from pathlib import Path

from invoke import Collection, task

from fbmvpn.errors import BadInput
from fbmvpn.registry import PEER_TYPES

from ._common import open_stack, say, step

TYPE_HELP = f"peer type: {', '.join(PEER_TYPES)}"
ID_HELP = "peer id, e.g. NODETAG (letters, digits, '.', '_', '-')"


def _tool(ctx, *args):
    stack = open_stack(ctx)
    with step(f"peer {args[0]}"):
        result = stack.peer_tool(*args, hide=False)
    return result


@task(help={"type": TYPE_HELP, "id": ID_HELP})
def genconf(ctx, type, id):
    """Generate the VPN config of a new peer on the server (never overwrites)."""
    _tool(ctx, "genconf", type, id)


@task(help={"type": TYPE_HELP, "id": ID_HELP, "key": "the peer's public key"})
def add(ctx, type, id, key):
    """Register a public key for a generated peer (a peer may hold several)."""
    _tool(ctx, "add", type, id, key)


@task(help={"type": TYPE_HELP, "id": ID_HELP})
def remove(ctx, type, id):
    """Unregister every key of a peer; its config stays for a later `add`."""
    _tool(ctx, "remove", type, id)


@task(help={"type": TYPE_HELP, "id": ID_HELP})
def removeconf(ctx, type, id):
    """Unregister every key of a peer and delete its config."""
    _tool(ctx, "removeconf", type, id)


@task(name="list", help={"json": "print JSON instead of a table"})
def list_(ctx, json=False):
    """List peers: type, id, address, keys and last handshake."""
    stack = open_stack(ctx)
    with step("peer list"):
        result = stack.peer_tool("list", *(["--json"] if json else []), probe=True)
    say(result.stdout.rstrip("\n"))


@task(
    help={
        "file": "text file, one verb per line: genconf TYPE ID, add TYPE ID KEY, "
        "remove TYPE ID, removeconf TYPE ID ('-' reads stdin)"
    }
)
def batch(ctx, file):
    """Apply many peer changes at once, all or none (one lock, one reload)."""
    stack = open_stack(ctx)
    with step("peer batch"):
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text()
        except OSError as error:
            raise BadInput(f"cannot read {file}: {error.strerror}") from None
        stack.peer_tool("batch", stdin=text, hide=False)


@task(
    help={
        "component": "local component to join: node, node2 or researcher",
        "id": "peer id (default: fbm.peers.<component> in the settings)",
        "gpu": "start the GPU variant of a node",
    }
)
def join(ctx, component, id="", gpu=False):
    """Join a local component to the VPN: genconf, copy, up, add, ping.

    Each step is skipped when already done, so running it again is safe.
    """
    stack = open_stack(ctx)
    peer_id = id or stack.settings["peers"].get(component, "")
    with step(f"peer.join {component}"):
        stack.join(component, peer_id, gpu=gpu)
    server_ip = stack.settings["vpn"]["server_ip"]
    say(f"{component} joined the VPN as {peer_id}: ping {server_ip} OK")


ns = Collection("peer", genconf, add, remove, removeconf, list_, batch, join)
