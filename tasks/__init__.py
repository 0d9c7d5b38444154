"""Invoke tasks for Fed-BioMed over WireGuard: `invoke --list` shows them all."""

import sys
from pathlib import Path

from invoke import Collection

# The library sits beside this package; make it importable from any folder.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fbmvpn.settings import DEFAULTS  # noqa: E402

from . import (  # noqa: E402
    build,
    clean,
    demo,
    deploy,
    gpu,
    image,
    peer,
    status,
    vpnserver,
)
from ._components import component_collection  # noqa: E402

ns = Collection()
ns.add_task(deploy.up)
ns.add_task(deploy.down)
ns.add_task(demo.demo)
for module in (build, vpnserver, peer, status, clean, gpu, image):
    ns.add_collection(module.ns)
for name in ("node", "node2", "researcher", "gui"):
    ns.add_collection(component_collection(name))
ns.configure({"fbm": DEFAULTS, "run": {"echo": True}})
