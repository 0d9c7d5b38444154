"""Tasks for several machines: `deploy` across an inventory (run with `fab`)."""

import contextlib
import json as jsonlib
import sys

from fabric import Connection
from invoke import Exit, task
from tabulate import tabulate

from fbmvpn import transfer
from fbmvpn.deploy import ROLES, parse_inventory
from fbmvpn.deploy import deploy as deploy_hosts

from ._common import is_remote, open_stack, say, step


def _entries(ctx, network, nodes, researcher, gui):
    fbm = ctx.config.fbm
    if network or nodes or researcher or gui:
        raw = [{"host": network, "role": "network"}] if network else []
        raw += [{"host": h, "role": "node"} for h in nodes.split(",") if h]
        raw += [{"host": researcher, "role": "researcher"}] if researcher else []
        raw += [{"host": h, "role": "gui"} for h in gui.split(",") if h]
    else:
        raw = list(fbm.hosts)
    with step("reading the inventory"):
        return parse_inventory(raw, dict(fbm.peers))


@task(
    help={
        "network": "host of the VPN server, e.g. admin@net.example.org:22",
        "nodes": "comma-separated node hosts",
        "researcher": "host of the researcher",
        "gui": "comma-separated hosts that run a node GUI",
        "public_addr": "address peers use to reach the VPN server "
        "(default: detected on the network host)",
        "accept_new_host": "accept SSH host keys not yet in known_hosts",
        "json": "print the final status as JSON",
    }
)
def deploy(
    ctx,
    network="",
    nodes="",
    researcher="",
    gui="",
    public_addr="",
    accept_new_host=False,
    json=False,
):
    """Deploy across machines: VPN server, then each node and researcher joins.

    Hosts come from the flags or from `fbm.hosts` in the settings. Safe to run
    again: hosts that need nothing are left as they are.
    """
    if is_remote(ctx):
        raise Exit(
            "deploy takes its hosts from --network/--nodes/... or fbm.hosts, not -H"
        )
    entries = _entries(ctx, network, nodes, researcher, gui)
    fbm = ctx.config.fbm
    if accept_new_host:
        fbm.remote.accept_new_host = True

    def connect(host):
        return Connection(host, config=ctx.config)

    def ship(stack, image):
        result = transfer.transfer_image(
            image, transfer.as_target(stack.host), status=stack.say
        )
        stack.say(result.summary())

    # With --json, stdout carries the JSON alone: progress goes to stderr.
    output = (
        contextlib.redirect_stdout(sys.stderr) if json else contextlib.nullcontext()
    )
    with output, step("deploy"):
        # This machine is the build machine: images are built here, then shipped.
        open_stack(ctx).build(sorted({ROLES[e.role] for e in entries}))
        rows = deploy_hosts(
            connect, fbm, entries, say=say, public_addr=public_addr or None, ship=ship
        )
    _report(rows, json)


def _report(rows, as_json):
    if as_json:
        say(jsonlib.dumps(rows, indent=2))
    else:
        table = [
            (
                r["host"],
                r["component"],
                r["state"],
                r.get("vpn_ip") or "-",
                {True: "OK", False: "FAIL"}.get(r.get("ping_server"), "-"),
            )
            for r in rows
        ]
        say(
            tabulate(
                table, headers=("host", "component", "state", "vpn ip", "ping server")
            )
        )
    broken = [f"{r['host']} {r['component']}" for r in rows if r["ok"] is False]
    if broken:
        raise Exit(f"broken: {', '.join(broken)}", code=1)
    if not as_json:
        say("deployment up on every host")
