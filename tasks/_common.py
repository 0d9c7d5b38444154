"""Glue shared by the task modules (not a task module itself)."""

import shlex
import sys
from contextlib import contextmanager

from invoke import Exit

from fbmvpn.errors import FbmVpnError
from fbmvpn.host import LocalHost
from fbmvpn.settings import Settings
from fbmvpn.stack import Stack


def say(message: str) -> None:
    print(message, flush=True)


def is_remote(ctx) -> bool:
    """True when `fab -H HOST` handed the task a Fabric Connection."""
    return hasattr(ctx, "sftp") and hasattr(ctx, "host")


def open_stack(ctx) -> Stack:
    """The Stack of the machine the task runs on: this one, or `fab -H HOST`."""
    if is_remote(ctx):
        from fbmvpn.deploy import remote_stack

        with step(f"connecting to {ctx.host}"):
            return remote_stack(ctx, ctx.config.fbm, say=say)
    with step("reading settings"):
        return Stack(LocalHost(ctx), Settings.from_config(ctx.config.fbm), say=say)


@contextmanager
def step(what: str):
    """Turn a library error into a one-line exit that names the failed step."""
    try:
        yield
    except FbmVpnError as error:
        raise Exit(f"{what} failed: {error}", code=1) from None


def confirm(question: str, yes: bool) -> None:
    """Ask before a destructive step; without a terminal, demand --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise Exit(f"{question} Not confirmed: no terminal; pass --yes to proceed.")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise Exit("Nothing deleted.", code=1)


def bring_up(stack, nodes=("node",), public_addr="", rebuild=False, gpu=False):
    """Build what is missing, start the VPN server, join the researcher and
    `nodes`: the first steps of `up` and `demo`."""
    peers = stack.settings["peers"]
    with step("checking Docker"):
        stack.check_engine()
        if gpu:
            stack.gpu_preflight()
        stack.check_researcher_host()
    with step("building images"):
        stack.build(["vpnserver", "node", "researcher"], force=rebuild)
    with step("starting the VPN server"):
        if not stack.host.exists(stack.server_config()):
            stack.vpnserver_init(public_addr or None)
        stack.up("vpnserver")
    with step("joining the researcher"):
        stack.join("researcher", peers["researcher"])
    for name in nodes:
        with step(f"joining {name}"):
            stack.join(name, peers[name], gpu=gpu)


def container_logs(ctx, name: str, follow=False, tail=100) -> None:
    """`docker logs` of a component's container."""
    stack = open_stack(ctx)
    argv = ["docker", "logs", "--tail", str(int(tail))]
    ctx.run(shlex.join(argv + (["-f"] if follow else []) + [stack.container(name)]))
