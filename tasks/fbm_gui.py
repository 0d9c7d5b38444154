"""Tasks of the node GUI: `up` with its certificate checks, `certs` to check only.

`register(collection, name)` adds them to the gui collection; its `up`
replaces the generic one of tasks/_components.py. The logic is in fbmvpn.gui.
"""

from invoke import task

from fbmvpn import gui

from ._common import open_stack, say, step

UP_HELP = {
    "host": "address of this machine to publish the GUI's ports on "
    "(GUI_SERVER_IP; default fbm.gui.host: 127.0.0.1)",
    "server_name": "name users type in their browser, written into a new "
    "self-signed certificate (default fbm.gui.server_name: localhost)",
    "restart": "restart the running GUI, e.g. after replacing its certificate",
    "expose": "confirm a --host other machines can reach (the GUI is then open "
    "to attacks from the network)",
}


def register(collection, name: str = "gui") -> None:
    """Add the GUI tasks to `collection` (its `up` replaces the generic one)."""

    @task(help=UP_HELP, auto_shortflags=False)
    def up(ctx, host="", server_name="", restart=False, expose=False):
        """Start the node GUI (HTTPS 8443, HTTP 8484); wait until it answers.

        Its certificate folder, gui/run_mounts/certs, must be empty (a
        self-signed certificate is made there at the first start and kept) or
        hold one .crt and one .key; anything else is refused before the
        container starts. An address other than loopback (--host) needs
        --expose. The node's Fed-BioMed component is created when
        missing. A certificate is read at start: after replacing it, run
        `gui.up --restart`.
        """
        if host:
            ctx.config.fbm.gui.host = host
        if server_name:
            ctx.config.fbm.gui.server_name = server_name
        if expose:
            ctx.config.fbm.gui.expose = True
        stack = open_stack(ctx)
        with step(f"{name}.up"):
            gui.gui_settings(stack)  # refused before anything is looked at
        with step("checking Docker"):
            stack.check_engine()
        with step(f"{name}.up"):
            address = gui.up(stack, restart=restart)
        http = stack.settings["gui"]["http_port"]
        say(f"gui up: {address} (plain HTTP on port {http})")
        say(
            f"first login: the [init_admin] account of "
            f"{stack.run_mounts('node')}/fbm/node/etc/config_gui.ini; change its "
            f"password in the GUI"
        )

    @task
    def certs(ctx):
        """Check the GUI's certificate folder (empty, or one .crt and one .key)."""
        stack = open_stack(ctx)
        with step(f"{name}.certs"):
            plan = gui.check_certs(stack)
        folder = gui.certs_dir(stack)
        if plan.generate:
            say(f"{folder}: empty; gui.up makes a self-signed certificate")
        else:
            say(f"{folder}: certificate {plan.cert}, key {plan.key}")

    for item in (up, certs):
        collection.add_task(item)
