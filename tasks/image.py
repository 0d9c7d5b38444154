"""Ship images from this (build) machine to node machines: stream or files.

fab -H admin@node1 image.push --images node          stream, only what lacks
invoke image.push --to admin@node1 --via-file DIR     the manual's two files
"""

from pathlib import Path

from invoke import Collection, Exit, task

from fbmvpn import templates
from fbmvpn.settings import Settings

from ._common import is_remote, say, step


def _target(ctx, to: str):
    from fabric import Connection  # SSH libraries load only when used

    from fbmvpn.deploy import secure

    if is_remote(ctx):
        conn = ctx
    elif to:
        conn = Connection(to, config=ctx.config)
    else:
        raise Exit("image.push needs a target: `fab -H HOST image.push` or --to HOST")
    return secure(conn, bool(ctx.config.fbm.remote.accept_new_host))


def node_compose_file(settings: Settings, folder: Path) -> Path:
    """Render the node-only compose file (the manual's docker-compose_run_node.yml)."""
    path = Path(folder) / "docker-compose_run_node.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        templates.render(
            "docker-compose_run_node.yml.j2",
            tag=settings.tag,
            instance=settings.instance,
            identity=settings.identity,
        )
    )
    return path


@task(
    help={
        "images": "comma-separated images to send (default: node)",
        "to": "target host (user@host:port) when not run as `fab -H HOST`",
        "via_file": "folder for the manual's files (image .tar.gz and run files); "
        "they are copied and unpacked on the target instead of streamed",
        "base_dir": "with --via-file: folder on the target to unpack the run files in",
        "full": "read the image with `docker save` rather than the engine's store",
    }
)
def push(ctx, images="node", to="", via_file="", base_dir="fbm-vpn", full=False):
    """Send images to a machine: only the layers it lacks; skipped when present.

    The loaded image ID and tags are checked on the target. An interrupted
    transfer leaves no partial image there; run the same command again.
    With --via-file the run files never carry keys (wg0.conf, config.env).
    """
    from fbmvpn import transfer

    target = _target(ctx, to)
    settings = Settings.from_config(ctx.config.fbm)
    for name in [n.strip() for n in images.split(",") if n.strip()]:
        image = f"fedbiomed/vpn-{name}:{settings.tag}"
        with step(f"sending {image}"):
            if not via_file:
                result = transfer.transfer_image(
                    image, target, source="save" if full else "auto", status=say
                )
                say(result.summary())
                continue
            run_files = None
            if name == "node":
                run_files = transfer.node_run_files(
                    node_compose_file(settings, Path(via_file)),
                    settings.mounts / "node" / "run_mounts",
                )
            bundle = transfer.ship_via_files(
                image,
                target,
                out_dir=Path(via_file),
                base_dir=base_dir,
                run_files=run_files,
                status=say,
            )
            say(
                f"{image}: files {bundle.image_file}, {bundle.files_file}; "
                f"unpacked in {base_dir} on the target"
            )


ns = Collection("image", push)
