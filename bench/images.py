"""Image sizes and build times of node and researcher (and the layers they share).

    python bench/images.py            warm numbers only (cache kept)
    python bench/images.py --cold     first empties Docker's build cache
                                      (`docker builder prune --all`: every
                                      project's cache on this engine) for a
                                      cold build, pip downloads included

Measured, each with `invoke build --images node,researcher` under a tag of its
own (bench-images):
  cold       nothing cached (only with --cold), else the first build of the tag
  no-op      again, nothing changed: the images are skipped
  code edit  after a change of the project's code (made in a scratch copy of
             the repository): the Fed-BioMed layer must come from the cache
Needs the base OS image (`invoke build.base-os`) and, behind a TLS proxy,
FBM_BENCH_CA_BUNDLE (default: the host's CA bundle).
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import ROOT, instance_env, invoke, scratch, timed

TAG = "bench-images"
IMAGES = ("fbm", "basefbm", "node", "researcher")
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"


def build(env, cwd=ROOT):
    """`invoke build` of node and researcher from `cwd`; raise with its output."""
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "build", "--images", "node,researcher"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode:
        raise SystemExit(f"build failed:\n{result.stdout[-3000:]}\n{result.stderr}")
    return result


def size(image: str) -> int | None:
    found = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Size}}", image],
        capture_output=True,
        text=True,
    )
    return int(found.stdout) if found.returncode == 0 else None


def code_edit_copy() -> Path:
    """A scratch copy of the repository with one line of project code changed."""
    copy = scratch("fbm-bench-images.") / "repo"
    shutil.copytree(
        ROOT,
        copy,
        ignore=shutil.ignore_patterns(".git", "run_mounts", "__pycache__", ".venv"),
    )
    for name in ("node", "node2", "researcher", "gui", "vpnserver"):
        (copy / "envs/vpn/docker" / name / "run_mounts").mkdir(exist_ok=True)
    init = copy / "fbmvpn" / "__init__.py"
    init.write_text(init.read_text() + "\n# bench: a code change\n")
    return copy


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cold", action="store_true", help="empty the whole build cache first"
    )
    args = parser.parse_args()

    mounts = scratch("fbm-bench-images-mounts.")
    env = instance_env("bench-images", 51860, mounts)
    ca = os.environ.get("FBM_BENCH_CA_BUNDLE", HOST_CA)
    env.update(
        INVOKE_FBM_TAG=TAG,
        INVOKE_FBM_BUILD_CA_BUNDLE=ca if Path(ca).is_file() else "",
    )
    for name in IMAGES:
        subprocess.run(
            ["docker", "image", "rm", f"fedbiomed/vpn-{name}:{TAG}"],
            capture_output=True,
        )
    if args.cold:
        subprocess.run(["docker", "builder", "prune", "--all", "--force"], check=True)

    runs = {}

    def measured(label, cwd=ROOT):
        seconds = timed(lambda: runs.__setitem__(label, build(env, cwd=cwd)))
        built = [line for line in runs[label].stdout.splitlines() if "built:" in line]
        runs[label] = built[-1] if built else "built: ?"
        return seconds

    first = measured("first")
    again = measured("again")
    copy = code_edit_copy()
    try:
        edited = measured("edited", cwd=copy)
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)
        invoke(env, "clean", "all", "--level", "config", "--yes", check=False)

    label = "cold (build cache emptied)" if args.cold else "first build of the tag"
    print(f"{label + ':':40} {first:8.1f} s   {runs['first']}")
    print(f"{'no-op (images current):':40} {again:8.1f} s   {runs['again']}")
    print(f"{'after a code change:':40} {edited:8.1f} s   {runs['edited']}")
    print()
    sizes = {name: size(f"fedbiomed/vpn-{name}:{TAG}") for name in IMAGES}
    for name, value in sizes.items():
        shown = "missing" if value is None else f"{value / 1e9:6.2f} GB"
        print(f"{f'fedbiomed/vpn-{name}:{TAG}':40} {shown}")
    if None not in sizes.values():
        own = {n: sizes[n] - sizes["basefbm"] for n in ("node", "researcher")}
        print(
            f"node and researcher share {sizes['basefbm'] / 1e9:.2f} GB of layers; "
            f"their own: node {own['node'] / 1e3:.0f} kB, "
            f"researcher {own['researcher'] / 1e3:.0f} kB"
        )


if __name__ == "__main__":
    main()
