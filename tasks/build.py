"""Build the images: `invoke build` (all missing), or chosen ones."""

from invoke import Collection, task

from fbmvpn.stack import IMAGES

from ._common import open_stack, say, step

ALL = ("vpnserver", "node", "researcher", "gui")


@task(
    default=True,
    help={
        "images": f"comma-separated images among {', '.join(IMAGES)} (default: all)",
        "force": "rebuild images that exist already",
        "ca_bundle": "PEM file of extra CA certificates trusted during builds",
        "base_image": "base OS image, e.g. fbm-local/debian:bookworm",
        "wheelhouse": "folder of wheels: install Fed-BioMed from it only (offline)",
    },
)
def images(ctx, images="", force=False, ca_bundle="", base_image="", wheelhouse=""):
    """Build missing images, each after the image it starts from.

    node, researcher and gui carry Fed-BioMed (fbm.fedbiomed_version) from the
    shared fbm image: its first build downloads several GB (torch), later code
    changes rebuild in seconds. `fbm.build.fedbiomed: false` builds them
    without it (VPN only). The same node image serves CPU and GPU nodes.
    """
    stack = open_stack(ctx)
    if base_image:
        stack.settings.raw["build"]["base_image"] = base_image
    names = [name.strip() for name in images.split(",") if name.strip()] or ALL
    with step("build"):
        built = stack.build(
            names, force=force, ca_bundle=ca_bundle, wheelhouse=wheelhouse
        )
    verb = "would build" if stack.host.dry else "built"
    say(f"{verb}: {', '.join(built) or 'nothing (all present)'}")


@task(
    help={
        "tag": "name of the image to create",
        "mirror": "Debian mirror debootstrap downloads from",
        "force": "recreate the image when it exists",
    }
)
def base_os(
    ctx,
    tag="fbm-local/debian:bookworm",
    mirror="http://deb.debian.org/debian",
    force=False,
):
    """Make a Debian bookworm base image locally (debootstrap), for offline hosts.

    Needs root and debootstrap. Use it with `invoke build --base-image TAG` or
    `fbm.build.base_image: TAG` in invoke.yaml.
    """
    stack = open_stack(ctx)
    with step("bootstrap of the base OS image"):
        made = stack.bootstrap_base_os(tag, mirror, force=force)
    say(f"{tag} {'created' if made else 'present; skipped'}")


ns = Collection("build", images, base_os)
