"""Fed-BioMed tasks of the researcher: Jupyter with a token, scripts and notebooks.

`register(collection, name)` adds them to the researcher's collection. The
logic is in fbmvpn.fedbiomed.
"""

import shlex

from invoke import task

from fbmvpn import fedbiomed

from ._common import open_stack, say, step


def register(collection, name: str = "researcher") -> None:
    """Add the Fed-BioMed tasks of the researcher to `collection`."""

    @task
    def jupyter(ctx):
        stack = open_stack(ctx)
        with step(f"{name}.jupyter"):
            url = fedbiomed.start_jupyter(stack)
        if url is None:
            say(
                "Jupyter runs already; its address and token were shown when it "
                "started (restart the researcher container for a new token)"
            )
        else:
            # The one place a secret is printed: the user needs it to log in.
            say(f"Jupyter: {url}")

    jupyter.__doc__ = (
        "Start Jupyter in the researcher (port 8888) and print its URL with a new "
        "token, once."
    )

    @task(
        help={
            "path": "a .py script or .ipynb notebook in the researcher's folders "
            "(run_mounts/samples, data or fbm); relative to samples",
            "args": "arguments for a script, as one string",
        }
    )
    def run(ctx, path, args=""):
        stack = open_stack(ctx)
        with step(f"{name}.run"):
            fedbiomed.run_script(stack, path, shlex.split(args))

    run.__doc__ = (
        "Run a script, or execute a notebook, in the researcher (Fed-BioMed's "
        "environment, its VPN address as gRPC server)."
    )

    for item in (jupyter, run):
        collection.add_task(item)
