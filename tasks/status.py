"""Health of the deployment on this machine."""

import json as jsonlib

from invoke import Collection, Exit, task

from ._common import open_stack, say, step


def _mark(value):
    return {True: "OK", False: "FAIL", None: "-"}.get(value, value)


@task(default=True, help={"json": "print JSON (for CI) instead of a table"})
def show(ctx, json=False):
    """Show each container, its VPN pings and handshake; exit 1 if broken.

    A node that runs but cannot reach the researcher names that hop.
    """
    stack = open_stack(ctx)
    with step("status"):
        rows = stack.status()
    if json:
        say(jsonlib.dumps(rows, indent=2))
    else:
        from tabulate import tabulate

        table = [
            (
                r["component"],
                r["state"],
                r.get("vpn_ip") or "-",
                _mark(r.get("ping_server")),
                _mark(r.get("ping_researcher")),
                {True: "yes", False: "no"}.get(r.get("gpu"), "-"),
                "-" if r.get("handshake_age_s") is None else f"{r['handshake_age_s']}s",
                _mark(r["ok"]),
            )
            for r in rows
        ]
        headers = (
            "component",
            "state",
            "vpn ip",
            "ping server",
            "ping researcher",
            "gpu",
            "handshake",
            "ok",
        )
        say(tabulate(table, headers=headers))
    broken = [r["component"] for r in rows if r["ok"] is False]
    if broken:
        raise Exit(f"broken: {', '.join(broken)}", code=1)


ns = Collection("status", show)
