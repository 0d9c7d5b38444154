"""The VPN server: settings, start, stop."""

import sys

from invoke import Collection, Exit, task

from ._common import open_stack, say, step


@task(
    help={
        "public_addr": "address (IP or DNS name) peers use to reach this machine; "
        "detected from the default route when omitted",
        "force": "rewrite config.env when it exists (peers keep their configs)",
    }
)
def init(ctx, public_addr="", force=False):
    """Write the VPN server's config.env from the settings."""
    stack = open_stack(ctx)
    with step("vpnserver.init"):
        stack.vpnserver_init(public_addr or None, force=force)


@task
def up(ctx):
    """Start the VPN server (writes its config first if missing) and wait for it."""
    stack = open_stack(ctx)
    with step("vpnserver.up"):
        if not stack.host.exists(stack.server_config()):
            stack.vpnserver_init()
        stack.up("vpnserver")
    say(f"vpnserver up: {stack.container('vpnserver')}")


@task
def down(ctx):
    """Stop the VPN server container (state is kept)."""
    stack = open_stack(ctx)
    with step("vpnserver.down"):
        stack.down("vpnserver")


@task
def shell(ctx):
    """Open a root shell in the VPN server container."""
    if not sys.stdin.isatty():
        raise Exit("vpnserver.shell is interactive and needs a terminal")
    stack = open_stack(ctx)
    ctx.run(f"docker exec -it {stack.container('vpnserver')} bash", pty=True)


ns = Collection("vpnserver", init, up, down, shell)
