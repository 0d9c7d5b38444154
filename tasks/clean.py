"""Remove what the deployment made, in the manual's three levels."""

from invoke import Collection, task

from fbmvpn.stack import COMPONENTS, check_level
from fbmvpn.stack import component as get_component

from ._common import confirm, open_stack, say, step


@task(
    default=True,
    positional=["component"],
    help={
        "component": f"one of {', '.join(COMPONENTS)}, or 'all'",
        "level": "container (1), config (2: also its config files) or image "
        "(3: also its image)",
        "datasets": "also delete user files: data folders (datasets), the "
        "researcher's samples, the GUI's certificates; off by default",
        "yes": "do not ask for confirmation (needed without a terminal)",
    },
)
def component(ctx, component, level="container", datasets=False, yes=False):
    """Remove a component's container, config or image (each level adds to the last).

    The config level deletes the component's run_mounts folders (VPN config,
    Fed-BioMed component); user files (data, samples, certs) stay unless
    --datasets is given. The question lists every folder it deletes.
    """
    stack = open_stack(ctx)
    names = list(COMPONENTS) if component == "all" else [component]
    with step("clean"):  # refuse bad arguments before asking anything
        check_level(level)
        for name in names:
            get_component(name)
    what = f"{level} level of {', '.join(names)}"
    folders = [
        str(folder)
        for name in names
        for folder in stack.clean_targets(name, level, datasets)
        if stack.host.exists(folder)
    ]
    if folders:
        what += ", with the folders " + ", ".join(folders)
    if datasets:
        what += " (user files INCLUDED)"
    confirm(f"Delete the {what} (instance {stack.settings.instance})?", yes)
    for name in names:
        with step(f"clean {name}"):
            done = stack.clean(name, level, datasets=datasets)
        verb = "would remove" if stack.host.dry else "removed"
        say(f"{name}: {verb} {'; '.join(done) or 'nothing (none was there)'}")
    if component == "all":
        with step("clean networks"):
            stack.compose("down", "--remove-orphans")


ns = Collection("clean", component)
