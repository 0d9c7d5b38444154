"""Task collections for the components run by compose: node, node2, researcher, gui.

Built by one factory so the four namespaces behave alike; each gets its own
task objects (none is shared between namespaces).
"""

import sys

from invoke import Collection, Exit, task

from fbmvpn.stack import component

from . import fbm_gui, fbm_node, fbm_researcher
from ._common import container_logs, open_stack, say, step


def component_collection(name: str) -> Collection:
    comp = component(name)

    def start(ctx, gpu=False):
        stack = open_stack(ctx)
        with step(f"{name}.up"):
            stack.up(name, gpu=gpu)
        say(f"{name} up: {stack.container(name)}")

    def start_without_gpu(ctx):
        start(ctx)

    if comp.gpu_service:
        start.__doc__ = f"Start the {name} container and wait until it is ready."
        up = task(start, name="up", help={"gpu": "start the GPU variant (NVIDIA)"})
    else:
        start_without_gpu.__doc__ = f"Start the {name} container; wait until ready."
        up = task(start_without_gpu, name="up")

    @task
    def down(ctx):
        stack = open_stack(ctx)
        with step(f"{name}.down"):
            stack.down(name)

    down.__doc__ = f"Stop the {name} container (its files are kept)."

    @task(help={"root": "open the shell as root instead of the run-time account"})
    def shell(ctx, root=False):
        if not sys.stdin.isatty():
            raise Exit(
                f"{name}.shell is interactive and needs a terminal; for one command "
                f"use `docker exec {name_hint(name)} COMMAND`"
            )
        stack = open_stack(ctx)
        user = [] if root else ["-u", str(stack.settings.identity.uid)]
        argv = ["docker", "exec", "-it", *user, stack.container(name), "bash"]
        ctx.run(" ".join(argv), pty=True)

    shell.__doc__ = f"Open an interactive shell in the {name} container."

    collection = Collection(name, up, down, shell)
    if comp.peer_type == "node":
        fbm_node.register(collection, name)  # its `logs` shows both logs
        return collection

    @task(help={"follow": "keep printing new lines", "tail": "lines to show"})
    def logs(ctx, follow=False, tail=100):
        container_logs(ctx, name, follow=follow, tail=tail)

    logs.__doc__ = f"Show the {name} container's log."
    collection.add_task(logs)
    if name == "researcher":
        fbm_researcher.register(collection, name)
    if name == "gui":
        fbm_gui.register(collection, name)  # its `up` checks the certificates
    return collection


def name_hint(name: str) -> str:
    return f"fedbiomed-vpn-{name}-<instance>"
