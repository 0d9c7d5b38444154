"""Fed-BioMed tasks of the researcher: its web tools (Jupyter with a token,
tensorboard) and where they are published, scripts and notebooks.

`register(collection, name)` adds them to the researcher's collection, with
an `up` that replaces the generic one: the same start, plus `--host`. The
logic is in fbmvpn.fedbiomed.
"""

import shlex

from invoke import Exit, task

from fbmvpn import fedbiomed

from ._common import open_stack, say, step

HOST_HELP = (
    "address of this machine to publish Jupyter and tensorboard on (default "
    "fbm.researcher.host: 127.0.0.1); other than loopback needs --expose; the "
    "container is recreated when the address changes"
)
EXPOSE_HELP = (
    "confirm a --host that other machines can reach (whoever reaches Jupyter "
    "with its token runs code in the container; tensorboard has no login)"
)
WEB_HELP = {"host": HOST_HELP, "expose": EXPOSE_HELP}


def publish(stack, host: str, expose: bool, always: bool = False) -> None:
    """Publish the web ports on `host`, else on fbm.researcher.host."""
    res = stack.settings["researcher"]
    fedbiomed.publish_researcher(
        stack,
        host or res["host"],
        expose=expose or bool(res.get("expose")),
        source="--host" if host else "fbm.researcher.host",
        always=always,
    )


def warn_if_exposed(stack) -> None:
    warning = fedbiomed.exposure_warning(stack)
    if warning:
        say(warning)


def register(collection, name: str = "researcher") -> None:
    """Add the Fed-BioMed tasks of the researcher to `collection`."""

    @task(help=WEB_HELP, auto_shortflags=False)
    def up(ctx, host="", expose=False):
        """Start the researcher; web ports on 127.0.0.1, or on --host.

        A different --host than the running container's recreates it: its VPN
        config and Fed-BioMed component stay in run_mounts, Jupyter and
        tensorboard must be started again. Without --host the address is
        fbm.researcher.host (127.0.0.1), so a later `up` without it returns
        to that address; set fbm.researcher.host (and fbm.researcher.expose)
        in invoke.yaml to keep another one.
        """
        stack = open_stack(ctx)
        with step(f"{name}.up"):
            publish(stack, host, expose, always=True)
        say(f"{name} up: {stack.container(name)}")
        warn_if_exposed(stack)

    @task(help=WEB_HELP, auto_shortflags=False)
    def jupyter(ctx, host="", expose=False):
        """Start Jupyter (port 8888); print its URL with a new token, once.

        Published on the container's current address unless --host is given
        (see `researcher.up`). Your notebooks go in
        researcher/run_mounts/samples, `notebooks/samples` in Jupyter. Inside
        the container Jupyter listens on the docker network only: the nodes
        cannot reach it over the VPN.
        """
        stack = open_stack(ctx)
        with step(f"{name}.jupyter"):
            if host:
                publish(stack, host, expose)
            url = fedbiomed.start_jupyter(stack)
        if url is None:
            say(
                "Jupyter runs already; its address and token were shown when it "
                "started (restart the researcher container for a new token)"
            )
        else:
            # The one place a secret is printed: the user needs it to log in.
            say(f"Jupyter: {url}")
        warn_if_exposed(stack)

    @task(help=WEB_HELP, auto_shortflags=False)
    def tensorboard(ctx, host="", expose=False):
        """Start tensorboard (port 6006) on Fed-BioMed's experiments.

        Prints its URL; says so when it runs already.

        It shows the experiments run with `tensorboard=True` (their files are
        in researcher/run_mounts/fbm/researcher/var/experiments). Published
        like Jupyter: the container's current address unless --host is given.
        """
        stack = open_stack(ctx)
        with step(f"{name}.tensorboard"):
            if host:
                publish(stack, host, expose)
            url, started = fedbiomed.start_tensorboard(stack)
        if started:
            say(f"tensorboard: {url} (logs: {fedbiomed.TENSORBOARD_LOGDIR})")
        else:
            say(f"tensorboard runs already: {url}")
        warn_if_exposed(stack)

    @task
    def samples(ctx):
        """Show the folder for your own scripts and notebooks and what it holds.

        It is researcher/run_mounts/samples: /fbm/notebooks/samples in the
        container, `notebooks/samples` in Jupyter; `researcher.run NAME` runs a
        file from it.
        """
        stack = open_stack(ctx)
        with step(f"{name}.samples"):
            folder, files = fedbiomed.list_samples(stack)
        say(f"samples: {folder} (/fbm/notebooks/samples in the container)")
        for item in files:
            say(f"  {item}")
        if files:
            say(f"run one with `invoke {name}.run NAME`")
        else:
            say(f"no .py or .ipynb file yet; put yours there, then `{name}.run NAME`")

    @task(
        help={
            "path": "a .py script or .ipynb notebook; relative paths start in "
            "researcher/run_mounts/samples; the data and fbm folders also work",
            "args": "arguments for a script, as one string",
        }
    )
    def run(ctx, path, args=""):
        """Run a script or a notebook in the researcher's Fed-BioMed.

        It runs in Fed-BioMed's environment, with the researcher's VPN address
        as gRPC server.

        A relative path is relative to researcher/run_mounts/samples
        (/fbm/notebooks/samples in the container); a notebook's output goes to
        NAME.out.ipynb beside it.
        """
        try:
            argv = shlex.split(args)
        except ValueError as error:
            raise Exit(
                f"{name}.run: --args {args!r}: {error}; quote each "
                f"argument once, e.g. --args \"--rounds 3 'my name'\""
            ) from None
        stack = open_stack(ctx)
        with step(f"{name}.run"):
            fedbiomed.run_script(stack, path, argv)

    for item in (up, jupyter, tensorboard, samples, run):
        collection.add_task(item)  # `up` replaces the generic one
