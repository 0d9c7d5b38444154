"""Shipping a node image: the manual's file sequence against streaming.

One run, one image (fedbiomed/vpn-node by default), a node machine made of a
real sshd on 127.0.0.1 in front of a second, empty Docker engine (the test
fixtures' code). Timed, with the bytes that cross SSH:

- the manual: `docker image save IMG | gzip > FILE`, `scp FILE`,
  `ssh ... 'docker image load < FILE'`;
- streaming (fbmvpn.transfer) of the same image to the emptied node engine;
- streaming after a one-layer rebuild (the image plus one changed layer);
- streaming again (nothing to send).

Targets (issue 4): full streaming at least 2x faster than the manual, the
one-layer case at least 10x. The manual has no incremental mode: its time for
the rebuilt image is taken to be the one measured (a few bytes more).

    python bench/transfer.py [--image fedbiomed/vpn-node:TAG] [--via-file]
"""

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, scratch

sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fbmvpn import transfer  # noqa: E402
from remote_fixtures import start_dockerd, start_sshd  # noqa: E402

CANDIDATES = (
    "fedbiomed/vpn-node:latest",
    "fedbiomed/vpn-node:dev",
    "fedbiomed/vpn-node:e2e",
)
REBUILT = "fbm-bench/vpn-node:rebuilt"
BRIDGE, BRIDGE_ADDRESS = "fbmbench0", "10.213.1.1/24"


def docker(*args, check=True):
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check
    )


def pick_image(wanted: str | None) -> str:
    for name in [wanted] if wanted else CANDIDATES:
        if docker("image", "inspect", name, check=False).returncode == 0:
            return name
    raise SystemExit(
        f"no image {wanted or ' / '.join(CANDIDATES)} here; build one first: "
        "invoke build --images node"
    )


def shell(command: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, shell=True, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"`{command}` failed: {done.stderr.strip()}")
    return time.perf_counter() - started


def empty_node(engine) -> None:
    """Back to an engine holding nothing, so the next load starts cold."""
    engine.docker("image", "prune", "-a", "-f")
    left = engine.docker("image", "ls", "-a", "-q").stdout.split()
    if left:
        raise SystemExit(f"the node engine still holds images: {left}")


def rebuild(image: str, workdir: Path) -> str:
    context = workdir / "rebuild"
    context.mkdir()
    (context / "stamp").write_text(f"rebuilt {time.time()}\n")
    (context / "Dockerfile").write_text(
        f"FROM {image}\nCOPY stamp /etc/fbm-bench-stamp\n"
    )
    docker("build", "-q", "-t", REBUILT, str(context))
    return REBUILT


def row(label: str, seconds: float, sent: int | None = None, extra: str = "") -> None:
    size = transfer.human(sent) if sent is not None else ""
    print(f"{label:<40} {seconds:8.1f} s {size:>10}  {extra}".rstrip(), flush=True)


def ratio(manual: float, other: float, target: float) -> str:
    value = manual / other
    verdict = "met" if value >= target else "MISSED"
    return f"{value:5.1f}x faster than the manual (target {target:g}x: {verdict})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="image to ship (default: a vpn-node image)")
    parser.add_argument(
        "--via-file", action="store_true", help="also time the tool's --via-file mode"
    )
    args = parser.parse_args()
    image = pick_image(args.image)
    work = scratch("fbm-bench-transfer.")
    engine = start_dockerd(work / "engine", bridge=BRIDGE, address=BRIDGE_ADDRESS)
    server = None
    try:
        server = start_sshd(work / "sshd", env={"DOCKER_HOST": engine.docker_host})
        ep = server.endpoint
        ssh_opts = " ".join(ep.ssh_options())
        remote = work / "remote"
        remote.mkdir()
        size = int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
        print(
            f"image {image} ({transfer.human(size)}), node engine behind sshd at "
            f"{ep.host}:{ep.port}\n"
        )

        file = work / "vpn-node-image.tar.gz"
        save = shell(f"docker image save {image} | gzip > {file}")
        row("manual: docker image save | gzip > file", save)
        copy = shell(f"scp -q {ssh_opts} -P {ep.port} {file} root@{ep.host}:{remote}/")
        row("manual: scp", copy)
        load = shell(
            f"ssh {ssh_opts} -p {ep.port} root@{ep.host} "
            f"'docker image load < {remote}/{file.name}'"
        )
        row("manual: docker image load < file", load)
        manual = save + copy + load
        row("manual, total", manual, file.stat().st_size)
        print()

        empty_node(engine)
        with ep.connect() as connection:
            node = transfer.SshTarget(connection)

            full = transfer.transfer_image(image, node, status=None)
            row(
                "streaming, full image",
                full.seconds,
                full.sent_bytes,
                ratio(manual, full.seconds, 2),
            )
            rebuilt = rebuild(image, work)
            one = transfer.transfer_image(rebuilt, node, status=None)
            row(
                f"streaming, one-layer rebuild ({one.layers_sent} of "
                f"{one.layers_total})",
                one.seconds,
                one.sent_bytes,
                ratio(manual, one.seconds, 10),
            )
            again = transfer.transfer_image(rebuilt, node, status=None)
            row(
                f"streaming, same image again ({again.mode})",
                again.seconds,
                again.sent_bytes,
                ratio(manual, again.seconds, 10),
            )
            if args.via_file:
                empty_node(engine)
                bundle = transfer.ship_via_files(
                    image,
                    node,
                    out_dir=work / "via-file",
                    base_dir=str(work / "node-base"),
                    remote_dir=str(remote),
                    status=None,
                )
                total = sum(bundle.timings.values())
                steps = ", ".join(f"{k} {v:.1f} s" for k, v in bundle.timings.items())
                row("tool --via-file (the manual's files)", total, bundle.sent_bytes)
                print(f"{'':<40} {steps}")
        print(
            f"\nraw archive {transfer.human(full.raw_bytes)} "
            f"(full), {transfer.human(one.raw_bytes)} (one layer); "
            f"{full.sent_bytes / file.stat().st_size:.0%} of the manual's file sent "
            f"for the full image ({full.source}, gzip level 1)"
        )
    finally:
        if server:
            server.stop()
        engine.stop()
        docker("image", "rm", REBUILT, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
