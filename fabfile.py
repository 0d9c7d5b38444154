"""Fabric entry points: every task of `invoke --list`, on any host.

    fab -H admin@node1.example.org node.up --gpu      one task on one host
    fab deploy --network net --nodes node1,node2 --researcher res

Settings: the same keys as invoke.yaml (`fab` reads fabric.yaml, a link to it),
FABRIC_FBM_* variables override them.
"""

import sys
from pathlib import Path

from invoke import Collection

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tasks import ns as local_ns  # noqa: E402
from tasks import remote  # noqa: E402

ns = Collection()
for local_task in local_ns.tasks.values():
    ns.add_task(local_task)
for collection in local_ns.collections.values():
    ns.add_collection(collection)
ns.add_task(remote.deploy)
ns.configure(local_ns.configuration())
