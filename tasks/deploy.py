"""The main job: the whole VPN stack on this machine, verified."""

from invoke import Exit, task

from ._common import bring_up, open_stack, say, step


@task(
    help={
        "gpu": "start the node with the NVIDIA GPU runtime",
        "rebuild": "rebuild the images even when present",
        "public_addr": "address peers use to reach the VPN server (default: detected)",
    }
)
def up(ctx, gpu=False, rebuild=False, public_addr=""):
    """Build what is missing, start the VPN server, join a node and a researcher.

    Ends with pings over the VPN: node and researcher to the server, node to the
    researcher. Safe to run again: what is done is left as it is.
    """
    stack = open_stack(ctx)
    server_ip = stack.settings["vpn"]["server_ip"]
    bring_up(stack, ("node",), public_addr, rebuild=rebuild, gpu=gpu)
    if stack.host.dry:
        return
    researcher_ip = stack.vpn_ip("researcher")
    checks = [
        ("node", server_ip),
        ("researcher", server_ip),
        ("node", researcher_ip),
    ]
    failed = []
    for name, target in checks:
        ok = stack.wait_ping(name, target)
        say(f"ping {name} -> {target}: {'OK' if ok else 'FAIL'}")
        if not ok:
            failed.append(f"{name} -> {target}")
    if failed:
        raise Exit(f"VPN check failed for {', '.join(failed)}; run `invoke status`")
    say("deployment up: VPN verified")


@task
def down(ctx):
    """Stop every container of this instance (state and images are kept)."""
    stack = open_stack(ctx)
    with step("down"):
        stack.write_compose_env()
        stack.compose("stop")
