"""Fed-BioMed tasks of a node (node, node2): datasets, training plans, the node.

`register(collection, name)` adds them to that component's collection; each
namespace gets task objects of its own. The logic is in fbmvpn.fedbiomed.
"""

import json as jsonlib

from invoke import task
from tabulate import tabulate

from fbmvpn import fedbiomed

from ._common import container_logs, open_stack, say, step

PATH_HELP = (
    "inside the node's data folder (run_mounts/data, /data in the container): "
    "relative to it, or absolute"
)


def register(collection, name: str) -> None:
    """Add the Fed-BioMed tasks of node `name` to `collection`."""

    @task(
        help={
            "path": f"CSV file, image folder or MNIST folder, {PATH_HELP}",
            "tag": "tag(s) researchers select the data with, comma-separated",
            "kind": "csv, images or mnist (default: detected)",
            "dataset_name": "name shown in lists (default: the first tag)",
            "description": "free text shown in lists",
        }
    )
    def dataset_add(ctx, path, tag, kind="", dataset_name="", description=""):
        stack = open_stack(ctx)
        with step(f"{name}.dataset-add"):
            entry = fedbiomed.add_dataset(
                stack,
                name,
                path,
                tag,
                kind=kind or None,
                data_name=dataset_name or None,
                description=description or None,
            )
        if entry.get("dataset_id"):
            say(f"dataset id: {entry['dataset_id']}")

    dataset_add.__doc__ = (
        f"Add a dataset from {name}'s data folder (CSV, image folder, MNIST folder)."
    )

    @task(help={"json": "print JSON instead of a table"})
    def dataset_list(ctx, json=False):
        stack = open_stack(ctx)
        with step(f"{name}.dataset-list"):
            rows = fedbiomed.list_datasets(stack, name)
        columns = ("name", "data_type", "tags", "shape", "path", "dataset_id")
        _show(rows, columns, json, f"{name}: no dataset")

    dataset_list.__doc__ = f"List the datasets of {name}."

    @task(help={"tag": "a tag of the dataset to remove (its files stay)"})
    def dataset_remove(ctx, tag):
        stack = open_stack(ctx)
        with step(f"{name}.dataset-remove"):
            fedbiomed.remove_dataset(stack, name, tag)

    dataset_remove.__doc__ = f"Remove a dataset from {name}'s list (files kept)."

    @task(
        help={
            "path": f"training plan source file, {PATH_HELP}",
            "plan_name": "unique name of the plan on this node",
            "description": "free text shown in lists",
        }
    )
    def training_plan_register(ctx, path, plan_name, description=""):
        stack = open_stack(ctx)
        with step(f"{name}.training-plan-register"):
            plan = fedbiomed.register_plan(
                stack, name, path, plan_name, description or None
            )
        if plan.get("training_plan_id"):
            say(f"training plan id: {plan['training_plan_id']}")

    training_plan_register.__doc__ = (
        f"Register (and approve) a training plan dropped in {name}'s data folder."
    )

    @task(
        help={
            "pending": "only the plans waiting for approval",
            "json": "print JSON instead of a table",
        }
    )
    def training_plan_list(ctx, pending=False, json=False):
        stack = open_stack(ctx)
        with step(f"{name}.training-plan-list"):
            plans = fedbiomed.list_plans(stack, name)
        if pending:
            plans = fedbiomed.pending_plans(plans)
        columns = (
            "name",
            "training_plan_id",
            "training_plan_type",
            "training_plan_status",
            "description",
        )
        _show(plans, columns, json, f"{name}: no plan")

    training_plan_list.__doc__ = f"List {name}'s training plans and their status."

    @task(help={"id": "training plan id (see training-plan-list)"})
    def training_plan_approve(ctx, id):
        stack = open_stack(ctx)
        with step(f"{name}.training-plan-approve"):
            fedbiomed.approve_plan(stack, name, id)

    training_plan_approve.__doc__ = f"Approve a training plan on {name} by its id."

    @task(
        help={
            "gpu": f"train on the GPU (the container must run `{name}.up --gpu`)",
            "no_approval": "accept any training plan (approval is on by default)",
            "no_default_plans": "refuse Fed-BioMed's default training plans",
        }
    )
    def start(ctx, gpu=False, no_approval=False, no_default_plans=False):
        stack = open_stack(ctx)
        with step(f"{name}.start"):
            fedbiomed.start_node(
                stack,
                name,
                gpu=gpu,
                approval=not no_approval,
                default_plans=not no_default_plans,
            )

    start.__doc__ = (
        f"Start Fed-BioMed in {name} (background); needs the VPN up. Training "
        f"plan approval is on and default plans allowed, as in the manual."
    )

    @task
    def stop(ctx):
        stack = open_stack(ctx)
        with step(f"{name}.stop"):
            fedbiomed.stop_node(stack, name)

    stop.__doc__ = f"Stop the Fed-BioMed node process in {name} (container stays)."

    @task(
        help={
            "tail": "lines to show",
            "follow": "keep printing new lines",
            "audit": "the security audit log (connections, approvals) instead",
            "container": "the container's own log (VPN, entrypoint) instead",
        }
    )
    def logs(ctx, tail=100, follow=False, audit=False, container=False):
        if container:
            container_logs(ctx, name, follow=follow, tail=tail)
            return
        stack = open_stack(ctx)
        with step(f"{name}.logs"):
            fedbiomed.node_logs(stack, name, tail=tail, follow=follow, audit=audit)

    logs.__doc__ = f"Show {name}'s Fed-BioMed log (--container: the container's)."

    for item in (
        dataset_add,
        dataset_list,
        dataset_remove,
        training_plan_register,
        training_plan_list,
        training_plan_approve,
        start,
        stop,
        logs,
    ):
        collection.add_task(item)


def _show(rows, columns, json: bool, empty: str) -> None:
    """Print a listing as JSON, or as a table of `columns` (`empty` if none)."""
    if json:
        say(jsonlib.dumps(rows, indent=2))
        return
    table = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    say(tabulate(table, headers=columns) if rows else empty)


def _cell(value) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
