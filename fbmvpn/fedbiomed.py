"""Fed-BioMed inside the containers: node components, datasets, training plans,
the node process, the researcher's Jupyter and scripts, and the demo experiment.

Every step runs Fed-BioMed's own command line (6.x, from /opt/fbm-venv) in a
container with `docker exec` as the run-time account, through the Stack's host,
so the same code drives this machine and remote ones. Inputs are checked before
anything changes; refusals are `BadInput`/`StateError` naming the fix.

Inside a node, the Fed-BioMed component lives in /fbm/node and datasets under
/data (the node's run_mounts/data); the researcher's component is
/fbm/researcher, and gRPC listens on its VPN address, port 50051.
"""

import ast
import configparser
import ipaddress
import json
import logging
import posixpath
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from .errors import BadInput, EngineError, StateError
from .stack import RESEARCHER_IP

log = logging.getLogger(__name__)

VENV = "/opt/fbm-venv"
FEDBIOMED = f"{VENV}/bin/fedbiomed"
PYTHON = f"{VENV}/bin/python"
JUPYTER = f"{VENV}/bin/jupyter"
NODE_ROOT = "/fbm/node"
RESEARCHER_ROOT = "/fbm/researcher"
DATA = "/data"
RESEARCHER_PORT = 50051
JUPYTER_PORT = 8888
JUPYTER_TOKEN_FILE = f"{RESEARCHER_ROOT}/.jupyter-token"
JUPYTER_LOG = f"{RESEARCHER_ROOT}/jupyter.log"
TENSORBOARD_PORT = 6006
# Fed-BioMed 6.x writes each experiment's tensorboard files under
# <component>/var/experiments/<experiment folder>/runs: one log dir for all.
TENSORBOARD_LOGDIR = f"{RESEARCHER_ROOT}/var/experiments"
TENSORBOARD_LOG = f"{RESEARCHER_ROOT}/tensorboard.log"
NODE_CONSOLE_LOG = f"{NODE_ROOT}/log/console.log"
APP_LOG = f"{NODE_ROOT}/log/application.log"
AUDIT_LOG = f"{NODE_ROOT}/log/security_audit.log"
NODES = ("node", "node2")

# Our names for the dataset formats, and Fed-BioMed's data_type for each.
DATASET_TYPES = {"csv": "csv", "images": "images", "mnist": "default"}
SUPPORTED = (
    "a .csv file, a folder of images with one sub-folder per class, or an "
    "MNIST folder (MNIST/raw/ holding the four idx files)"
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ fedbiomed ")
_RULE = re.compile(r"^-+( {2,}-+)*\s*$")

# Runs in the container with Debian's python3: what is at PATH, seen from
# inside (links included), and which of the supported formats it has.
_INSPECT = r"""
import json, os, sys
path, roots = sys.argv[1], sys.argv[2:]
mnist = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
images = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
real = os.path.realpath(path)
out = {"exists": os.path.exists(path), "file": os.path.isfile(path),
       "size": os.path.getsize(path) if os.path.isfile(path) else 0,
       "inside": any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots),
       "kind": None, "reason": ""}
if out["file"]:
    if not path.lower().endswith(".csv"):
        out["reason"] = "a file that is not a .csv"
    elif os.path.getsize(path) == 0:
        out["reason"] = "an empty CSV file"
    else:
        with open(path, "rb") as f:
            rows = [line for line in f.read(65536).splitlines() if line.strip()]
        if len(rows) < 2:
            out["reason"] = "a CSV file with a header but no data row"
        else:
            out["kind"] = "csv"
elif os.path.isdir(path):
    raw = os.path.join(path, "MNIST", "raw")
    subdirs = [os.path.join(path, d) for d in sorted(os.listdir(path))]
    subdirs = [d for d in subdirs if os.path.isdir(d)]
    if all(os.path.isfile(os.path.join(raw, f)) for f in mnist):
        out["kind"] = "mnist"
    elif any(f.lower().endswith(images) for d in subdirs for f in os.listdir(d)):
        out["kind"] = "images"
    else:
        out["reason"] = ("a folder with neither MNIST/raw/ idx files nor class "
                         "sub-folders holding images")
print(json.dumps(out))
"""


# -- commands in the containers -----------------------------------------------


def exec_argv(stack, name, argv, *, env=None, stdin=False, detach=False, workdir=None):
    """`docker exec` of `argv` in a component, as the run-time account."""
    ident = stack.settings.identity
    command = ["docker", "exec", "-u", f"{ident.uid}:{ident.gid}"]
    command += ["-i"] if stdin else []
    command += ["-d"] if detach else []
    command += ["-w", workdir] if workdir else []
    for key, value in (env or {}).items():
        command += ["-e", f"{key}={value}"]
    return command + [stack.container(name), *argv]


def _run(stack, name, argv, *, env=None, stdin=None, hide="both", workdir=None):
    """A command that changes something: echoed, skipped in a dry run."""
    command = exec_argv(
        stack, name, argv, env=env, stdin=stdin is not None, workdir=workdir
    )
    return stack.host.run(command, hide=hide, warn=True, stdin=stdin)


def _probe(stack, name, argv, *, env=None):
    """A read-only command: silent, and run in a dry run too."""
    return stack.host.probe(exec_argv(stack, name, argv, env=env))


def fedbiomed_error(result) -> str:
    """The reason Fed-BioMed gave for a failure: its last FBnnn message or
    exception line, without the traceback around it."""
    text = _ANSI.sub("", (result.stdout or "") + "\n" + (result.stderr or ""))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    coded = [line for line in lines if re.search(r"\bFB\d{3}\b", line)]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    found = (coded or raised or [_tail(result, 3)])[-1]
    return re.sub(r"^.*?\b(FB\d{3}\b)", r"\1", found)


def _inspect(stack, name, template):
    """`docker inspect -f template` of a component's container (a probe)."""
    argv = ["docker", "inspect", "--type", "container", "-f", template]
    return stack.host.probe([*argv, stack.container(name)])


def _tail(result, lines: int = 6) -> str:
    """The last meaningful lines of a failed command, for an error message."""
    text = _ANSI.sub("", (result.stdout or "") + "\n" + (result.stderr or ""))
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:]) or f"exit code {result.exited}"


def require_running(stack, name: str) -> None:
    """Fail unless the component's container runs with Fed-BioMed inside."""
    if stack.state(name) != "running":
        raise StateError(
            f"the {name} container is not running; start it with `invoke "
            f"{name}.up` (`invoke peer.join {name}` the first time)"
        )
    if not stack.host.dry and not _probe(stack, name, ["test", "-x", FEDBIOMED]).ok:
        raise StateError(
            f"the {name} container has no Fed-BioMed (its image was built with "
            f"fbm.build.fedbiomed false); set it true, then `invoke build` and "
            f"`invoke {name}.up`"
        )


def require_vpn(stack, name: str) -> None:
    """Fail fast, without waiting, when the component has no working tunnel."""
    if stack.host.dry:
        return
    server_ip = stack.settings["vpn"]["server_ip"]
    if not stack.ping(name, server_ip, count=2):
        raise StateError(
            f"the VPN of {name} is not up (no answer from the VPN server "
            f"{server_ip}); check `invoke status`: start the server "
            f"(`invoke vpnserver.up`) or join {name} (`invoke peer.join {name}`)"
        )


def researcher_ip(stack) -> str:
    """The researcher's VPN address: from its config here, else the default."""
    return stack.vpn_ip("researcher") or RESEARCHER_IP


# -- paths ----------------------------------------------------------------------


def container_path(path: str, mounts) -> str:
    """Map a user's path to the container's view of it.

    `mounts` lists (host folder, container folder) pairs, the first being the
    component's main folder. A relative path is relative to that folder; an
    absolute one may name the host folder or the container folder. A path
    leading outside every mount is refused.
    """
    text = str(path).strip()
    if not text:
        raise BadInput("empty path; give a file or folder inside the data folder")
    pairs = [(posixpath.normpath(str(h)), posixpath.normpath(c)) for h, c in mounts]
    if not text.startswith("/"):
        relative = posixpath.normpath(text)
        if relative == ".." or relative.startswith("../"):
            raise BadInput(
                f"{path} is outside {pairs[0][0]} ({pairs[0][1]} in the "
                f"container); move or copy it there first"
            )
        return posixpath.normpath(posixpath.join(pairs[0][1], relative))
    absolute = posixpath.normpath(text)
    for side in (0, 1):  # host folders first, then container folders
        for pair in sorted(pairs, key=lambda p: len(p[side]), reverse=True):
            root = pair[side]
            if absolute == root or absolute.startswith(root.rstrip("/") + "/"):
                rest = posixpath.relpath(absolute, root)
                return posixpath.normpath(posixpath.join(pair[1], rest))
    inside = " or ".join(f"{h} ({c} in the container)" for h, c in pairs)
    raise BadInput(f"{path} is outside {inside}; move or copy it there first")


def node_mounts(stack, name: str):
    return [(stack.run_mounts(name) / "data", DATA)]


def researcher_mounts(stack):
    mounts = stack.run_mounts("researcher")
    return [
        (mounts / "samples", "/fbm/notebooks/samples"),
        (mounts / "data", DATA),
        (mounts / "fbm", "/fbm"),
    ]


def inspect_path(stack, name: str, path: str, *roots: str) -> dict:
    """What `path` is in the container: exists, file, format, and whether it
    stays inside one of `roots` once links are resolved."""
    result = _probe(stack, name, ["python3", "-c", _INSPECT, path, *roots])
    try:
        return json.loads((result.stdout or "").strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise EngineError(
            f"cannot inspect {path} in {name}: {_tail(result)}; check "
            f"`invoke status` and `docker logs {stack.container(name)}`"
        ) from None


# -- Fed-BioMed's printed tables ----------------------------------------------


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of the first table printed by `tabulate` (plain format) in `text`.

    Column bounds come from the dashes under the header, so cells may hold
    spaces; the table ends at a blank line or at a log line.
    """
    lines = [_ANSI.sub("", line.rstrip("\n")) for line in text.splitlines()]
    for index, line in enumerate(lines):
        if index == 0 or not line.startswith("-") or not _RULE.match(line):
            continue
        spans = [m.span() for m in re.finditer(r"-+", line)]
        header = lines[index - 1]
        names = _cells(header, spans)
        rows = []
        for row in lines[index + 1 :]:
            if not row.strip() or _LOG_LINE.match(row):
                break
            rows.append(dict(zip(names, _cells(row, spans), strict=True)))
        return rows
    return []


def _cells(line: str, spans) -> list[str]:
    cells = [line[start:end].strip() for start, end in spans[:-1]]
    return cells + [line[spans[-1][0] :].strip()]


def parse_tags(text: str) -> list[str]:
    """Tags as Fed-BioMed prints them (a Python list) or comma-separated."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text.split(",")
    if isinstance(value, str):
        value = [value]
    return [str(tag).strip() for tag in value if str(tag).strip()]


def check_tags(text: str) -> list[str]:
    """Comma-separated tags, each as Fed-BioMed accepts them (3+ characters)."""
    tags = [tag.strip() for tag in str(text).split(",") if tag.strip()]
    bad = [tag for tag in tags if len(tag) < 3 or re.search(r"[\s'\"\[\]]", tag)]
    if not tags or bad:
        raise BadInput(
            f"bad dataset tag(s) {text!r}: give one or more comma-separated tags of "
            f"at least 3 characters, without spaces or quotes, e.g. demo-cancer"
        )
    twice = sorted({tag for tag in tags if tags.count(tag) > 1})
    if twice:
        raise BadInput(f"tag(s) {', '.join(twice)} given twice in {text!r}")
    return tags


def tag_conflicts(tags, datasets) -> list[str]:
    """Names of the datasets whose tags clash with `tags`, by Fed-BioMed's rule
    (one tag set contains the other: a researcher could not tell them apart)."""
    wanted = set(tags)
    return [
        d.get("name", "?")
        for d in datasets
        if d["tags"] and (wanted <= set(d["tags"]) or set(d["tags"]) <= wanted)
    ]


# -- node component -------------------------------------------------------------


def check_node(name: str) -> None:
    if name not in NODES:
        raise BadInput(f"{name!r} is not a node; use one of: {', '.join(NODES)}")


def node_env(stack, approval: bool = True, default_plans: bool = True) -> dict:
    """FBM_* variables of a node: researcher address and security switches."""
    return {
        "FBM_NODE_COMPONENT_ROOT": NODE_ROOT,
        "FBM_RESEARCHER_IP": researcher_ip(stack),
        "FBM_RESEARCHER_PORT": str(RESEARCHER_PORT),
        "FBM_SECURITY_TRAINING_PLAN_APPROVAL": str(bool(approval)),
        "FBM_SECURITY_ALLOW_DEFAULT_TRAINING_PLANS": str(bool(default_plans)),
    }


def node_cli(*args: str) -> list[str]:
    return [FEDBIOMED, "node", "--path", NODE_ROOT, *args]


def has_node_component(stack, name: str) -> bool:
    return _probe(stack, name, ["test", "-s", f"{NODE_ROOT}/.fedbiomed"]).ok


def ensure_node(stack, name: str) -> bool:
    """Create the node's Fed-BioMed component unless it exists; True if created.

    Its config points at the researcher's VPN address, port 50051.
    """
    check_node(name)
    require_running(stack, name)
    if has_node_component(stack, name):
        return False
    alias = stack.settings["peers"].get(name, name)
    argv = [FEDBIOMED, "component", "create", "--component", "NODE"]
    argv += ["--path", NODE_ROOT, "--name", alias, "--exist-ok"]
    result = _run(stack, name, argv, env=node_env(stack))
    if not result.ok:
        raise EngineError(
            f"creating the Fed-BioMed node component in {name} failed:\n"
            f"{_tail(result)}\nsee `invoke {name}.logs`"
        )
    stack.say(
        f"{name}: Fed-BioMed node component {alias} in {NODE_ROOT} "
        f"(researcher {researcher_ip(stack)}:{RESEARCHER_PORT})"
    )
    return True


def node_id(stack, name: str) -> str | None:
    """The Fed-BioMed id of a node (from its component config), if created."""
    result = _probe(stack, name, ["cat", f"{NODE_ROOT}/etc/config.ini"])
    if not result.ok:
        return None
    config = configparser.ConfigParser()
    config.read_string(result.stdout or "")
    return config.get("default", "id", fallback=None)


# -- datasets -------------------------------------------------------------------


def node_table(stack, name: str, what: str, *command: str) -> list[dict]:
    """The rows of a Fed-BioMed listing of the node (`dataset list`,
    `training-plan list`); none before its component exists."""
    check_node(name)
    require_running(stack, name)
    if not has_node_component(stack, name):
        return []
    result = _probe(stack, name, node_cli(*command), env=node_env(stack))
    if not result.ok:
        raise EngineError(f"listing the {what} of {name} failed:\n{_tail(result)}")
    return parse_table(result.stdout or "")


def list_datasets(stack, name: str) -> list[dict]:
    """The node's datasets, from `dataset list` (tags as lists)."""
    rows = node_table(stack, name, "datasets", "dataset", "list")
    for row in rows:
        row["tags"] = parse_tags(row.get("tags", ""))
    return rows


def add_dataset(
    stack,
    name: str,
    path: str,
    tags: str,
    *,
    kind: str | None = None,
    data_name: str | None = None,
    description: str | None = None,
    datasets: list | None = None,
) -> dict:
    """Register a dataset placed in the node's data folder; return its entry.

    Refused, with nothing changed: a path missing or outside the data folder,
    a format other than CSV / image folder / MNIST folder, a tag in use.
    `datasets` is the node's list when the caller has just read it.
    """
    check_node(name)
    if kind is not None and kind not in DATASET_TYPES:
        raise BadInput(
            f"unknown format {kind!r}; use one of: {', '.join(DATASET_TYPES)}"
        )
    wanted = check_tags(tags)
    mounts = node_mounts(stack, name)
    target = container_path(path, mounts)
    require_running(stack, name)

    info = inspect_path(stack, name, target, DATA)
    if not info["exists"]:
        raise BadInput(
            f"{path} does not exist ({name} sees {target}); place the data under "
            f"{mounts[0][0]} first"
        )
    if not info["inside"]:
        raise BadInput(
            f"{path} is a link leading outside {name}'s data folder; copy the "
            f"data into {mounts[0][0]} instead"
        )
    if info["kind"] is None:
        raise BadInput(
            f"unsupported dataset format at {path}: {info['reason']}; supported: "
            f"{SUPPORTED}"
        )
    if kind and kind != info["kind"]:
        raise BadInput(f"{path} is not a {kind} dataset: it looks like {info['kind']}")
    kind = info["kind"]

    if ensure_node(stack, name):
        datasets = []
    elif datasets is None:
        datasets = list_datasets(stack, name)
    clashes = tag_conflicts(wanted, datasets)
    if clashes:
        raise BadInput(
            f"tag {','.join(wanted)} is already used on {name} by dataset "
            f"{', '.join(clashes)}; choose another tag, or remove that dataset "
            f"first (`invoke {name}.dataset-remove TAG`)"
        )
    entry = {
        "path": target,
        "data_type": DATASET_TYPES[kind],
        "tags": ",".join(wanted),
        "name": data_name or wanted[0],
        "description": description or f"{kind} data {PurePosixPath(target).name}",
    }
    for key in ("name", "description"):
        if len(entry[key]) < 3:
            raise BadInput(f"dataset {key} {entry[key]!r} is too short (3+ characters)")

    # The description goes through a file Fed-BioMed reads (`dataset add --file`).
    script = 'f=$(mktemp) && cat >"$f" && "$@" "$f"; rc=$?; rm -f "$f"; exit $rc'
    argv = ["sh", "-c", script, "sh", *node_cli("dataset", "add", "--file")]
    result = _run(stack, name, argv, env=node_env(stack), stdin=json.dumps(entry))
    if stack.host.dry:
        return entry
    # Fed-BioMed lists the node's datasets after adding one.
    added = [d for d in parse_table(result.stdout or "") if d.get("tags")]
    added = [d for d in added if set(wanted) <= set(parse_tags(d["tags"]))]
    if not result.ok or not added:
        raise EngineError(
            f"Fed-BioMed did not add the dataset on {name}: "
            f"{fedbiomed_error(result)}\ncheck the data: {SUPPORTED}, readable, "
            f"a CSV with a header row and one delimiter; then run the same task "
            f"again (nothing was added)"
        )
    stack.say(f"{name}: dataset {entry['name']} ({kind}, tags {entry['tags']}) added")
    return added[0]


def remove_dataset(stack, name: str, tag: str) -> str:
    """Unregister the dataset carrying `tag` (its files stay); return its name."""
    datasets = list_datasets(stack, name)
    matches = [i for i, d in enumerate(datasets) if tag in d["tags"]]
    if not matches:
        raise BadInput(
            f"no dataset tagged {tag!r} on {name}; see `invoke {name}.dataset-list`"
        )
    if len(matches) > 1:
        names = ", ".join(datasets[i]["name"] for i in matches)
        raise BadInput(
            f"tag {tag!r} is on several datasets of {name} ({names}); give a tag "
            f"only one of them has"
        )
    # Fed-BioMed's `dataset delete` asks for the dataset's rank in its list.
    index = matches[0]
    result = _run(
        stack,
        name,
        node_cli("dataset", "delete"),
        env=node_env(stack),
        stdin=f"{index + 1}\n",
    )
    if stack.host.dry:
        return datasets[index]["name"]
    if not result.ok or any(tag in d["tags"] for d in list_datasets(stack, name)):
        raise EngineError(
            f"removing dataset {tag!r} on {name} failed:\n{_tail(result)}"
        )
    stack.say(f"{name}: dataset {datasets[index]['name']} removed (files kept)")
    return datasets[index]["name"]


# -- training plans -------------------------------------------------------------


def list_plans(stack, name: str) -> list[dict]:
    """The node's training plans, from `training-plan list`."""
    return node_table(stack, name, "training plans", "training-plan", "list")


def register_plan(
    stack, name: str, path: str, plan_name: str, description: str | None = None
) -> dict:
    """Register (and so approve) a training plan file from the data folder."""
    check_node(name)
    if len(plan_name.strip()) < 3 or "\n" in plan_name:
        raise BadInput(
            f"training plan name {plan_name!r}: give 3+ characters, one line"
        )
    description = description or f"registered from {path}"
    target = container_path(path, node_mounts(stack, name))
    require_running(stack, name)
    info = inspect_path(stack, name, target, DATA)
    if not info["file"] or not info["inside"]:
        raise BadInput(
            f"{path} is not a file inside {name}'s data folder ({target}); drop the "
            f"training plan (Python source) into {node_mounts(stack, name)[0][0]}"
        )
    if not info.get("size"):
        raise BadInput(f"{path} is empty; a training plan is a Python source file")
    ensure_node(stack, name)
    if any(p.get("name") == plan_name for p in list_plans(stack, name)):
        raise BadInput(
            f"a training plan named {plan_name!r} exists on {name}; choose another "
            f"name (`invoke {name}.training-plan-list`)"
        )
    # `training-plan register` asks for name, description and path in turn.
    answers = f"{plan_name}\n{description}\n{target}\n"
    result = _run(
        stack,
        name,
        node_cli("training-plan", "register"),
        env=node_env(stack),
        stdin=answers,
    )
    if stack.host.dry:
        return {"name": plan_name}
    found = [p for p in list_plans(stack, name) if p.get("name") == plan_name]
    if not result.ok or not found:
        raise EngineError(
            f"Fed-BioMed did not register {path} on {name}: "
            f"{fedbiomed_error(result)}\nfix the plan's Python code, or, when the "
            f"same code is registered under another name, use that one "
            f"(`invoke {name}.training-plan-list`)"
        )
    stack.say(f"{name}: training plan {plan_name} registered and approved")
    return found[0]


def approve_plan(stack, name: str, plan_id: str, plans: list | None = None) -> None:
    """Approve a pending (or rejected) training plan by its id.

    `plans` is the node's list when the caller has just read it.
    """
    plans = list_plans(stack, name) if plans is None else plans
    plan = next((p for p in plans if p.get("training_plan_id") == plan_id), None)
    if plan is None:
        raise BadInput(
            f"no training plan {plan_id!r} on {name}; see `invoke "
            f"{name}.training-plan-list` for the ids"
        )
    if plan.get("training_plan_status") == "Approved":
        stack.say(f"{name}: training plan {plan_id} is approved already")
        return
    argv = node_cli("training-plan", "approve", "--id", plan_id)
    result = _run(stack, name, argv, env=node_env(stack))
    if not result.ok:
        raise EngineError(f"approving {plan_id} on {name} failed:\n{_tail(result)}")
    stack.say(f"{name}: training plan {plan_id} approved")


def pending_plans(plans, description: str | None = None) -> list[dict]:
    return [
        p
        for p in plans
        if p.get("training_plan_status") == "Pending"
        and (description is None or p.get("description") == description)
    ]


# -- node process ---------------------------------------------------------------


def node_running(stack, name: str) -> bool:
    """True when the Fed-BioMed node process runs in the container."""
    found = _probe(stack, name, ["pgrep", "-f", "fedbiomed.node.node_pm"])
    return found.ok


def start_node(
    stack,
    name: str,
    *,
    gpu: bool = False,
    approval: bool = True,
    default_plans: bool = True,
    timeout: float = 120,
) -> bool:
    """Start the Fed-BioMed node in the background; False when running already.

    Refuses at once when the container or its VPN is down. The node then
    connects to the researcher by itself, whenever the researcher listens.
    """
    check_node(name)
    require_running(stack, name)
    if gpu and not stack.container(name).startswith(f"fedbiomed-vpn-{name}-gpu-"):
        raise StateError(
            f"{name} runs without the GPU runtime, so --gpu would train on the "
            f"CPU; restart it on the GPU first: `invoke {name}.up --gpu` (checks "
            f"the host), then `invoke {name}.start --gpu`"
        )
    require_vpn(stack, name)
    ensure_node(stack, name)
    if node_running(stack, name):
        stack.say(
            f"{name}: Fed-BioMed node running already, with the options it was "
            f"started with; to change them: `invoke {name}.stop`, then "
            f"`invoke {name}.start` with the new ones"
        )
        return False
    target = researcher_ip(stack)
    if not stack.host.dry and not stack.ping(name, target, count=1):
        stack.say(
            f"{name}: the researcher ({target}) does not answer yet; the node "
            f"will keep trying to reach it"
        )

    # Only log lines written after this start count.
    count = _probe(stack, name, ["sh", "-c", 'cat "$0" 2>/dev/null | wc -l', APP_LOG])
    first = int((count.stdout or "0").strip() or 0) + 1

    # The node process outlives this command: its console goes to a file.
    script = 'exec "$@" >>"$0" 2>&1'
    argv = ["sh", "-c", script, NODE_CONSOLE_LOG, *node_cli("start", "--background")]
    argv += ["--gpu"] if gpu else []
    env = node_env(stack, approval=approval, default_plans=default_plans)
    result = _run(stack, name, argv, env=env)
    if stack.host.dry:
        return True
    if not result.ok:
        raise EngineError(f"starting the node in {name} failed:\n{_tail(result)}")

    ready = 'tail -n "+$1" "$0" | grep -q "Starting task manager"'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not node_running(stack, name):
            break
        if _probe(stack, name, ["sh", "-c", ready, APP_LOG, str(first)]).ok:
            stack.say(
                f"{name}: Fed-BioMed node started (training plan approval "
                f"{'on' if approval else 'off'}, default plans "
                f"{'allowed' if default_plans else 'refused'}"
                f"{', GPU' if gpu else ''})"
            )
            return True
        time.sleep(2)
    console = _probe(stack, name, ["tail", "-n", "15", NODE_CONSOLE_LOG])
    raise EngineError(
        f"the Fed-BioMed node in {name} did not start within {timeout:.0f} s; "
        f"last console lines:\n{(console.stdout or '').strip()}"
    )


def stop_node(stack, name: str) -> bool:
    """Stop the Fed-BioMed node process; False when it was not running."""
    check_node(name)
    require_running(stack, name)
    if not node_running(stack, name):
        stack.say(f"{name}: Fed-BioMed node not running")
        return False
    result = _run(stack, name, node_cli("stop"), env=node_env(stack))
    if stack.host.dry:
        return True
    for _ in range(30):
        if not node_running(stack, name):
            stack.say(f"{name}: Fed-BioMed node stopped")
            return True
        time.sleep(1)
    raise EngineError(
        f"the Fed-BioMed node in {name} is still running after `stop`:\n"
        f"{_tail(result)}\nrestart the container: `invoke {name}.down` then "
        f"`invoke {name}.up`"
    )


def node_logs(stack, name: str, tail: int = 100, follow: bool = False, audit=False):
    """Print the node's application log (or its security audit log)."""
    check_node(name)
    require_running(stack, name)
    path = AUDIT_LOG if audit else APP_LOG
    argv = ["tail", "-n", str(int(tail))] + (["-F"] if follow else []) + [path]
    return stack.host.run(exec_argv(stack, name, argv), hide=False, warn=True)


def researcher_connections(stack, name: str) -> list[str]:
    """Addresses this node connected to, from its security audit log."""
    result = _probe(stack, name, ["cat", AUDIT_LOG])
    found = re.findall(
        r"Successfully connected to researcher server at ([0-9.]+:\d+)",
        result.stdout or "",
    )
    return sorted(set(found))


def wg_transfer(stack, name: str) -> tuple[int, int]:
    """Bytes received and sent through the component's tunnel so far."""
    result = stack.exec(name, ["wg", "show", "wg0", "transfer"], probe=True)
    received = sent = 0
    for line in (result.stdout or "").splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            received += int(parts[1])
            sent += int(parts[2])
    return received, sent


# -- researcher -----------------------------------------------------------------


def researcher_env(stack) -> dict:
    return {
        "FBM_RESEARCHER_COMPONENT_ROOT": RESEARCHER_ROOT,
        "FBM_SERVER_HOST": researcher_ip(stack),
        "FBM_SERVER_PORT": str(RESEARCHER_PORT),
    }


def ensure_researcher(stack) -> bool:
    """Create the researcher component (gRPC on its VPN address) unless present."""
    require_running(stack, "researcher")
    marker = f"{RESEARCHER_ROOT}/.fedbiomed"
    if _probe(stack, "researcher", ["test", "-s", marker]).ok:
        return False
    argv = [FEDBIOMED, "component", "create", "--component", "RESEARCHER"]
    argv += ["--path", RESEARCHER_ROOT, "--exist-ok"]
    result = _run(stack, "researcher", argv, env=researcher_env(stack))
    if not result.ok:
        raise EngineError(
            f"creating the Fed-BioMed researcher component failed:\n{_tail(result)}"
        )
    stack.say(
        f"researcher: Fed-BioMed component in {RESEARCHER_ROOT} (gRPC "
        f"{researcher_ip(stack)}:{RESEARCHER_PORT})"
    )
    return True


# -- the researcher's web tools ---------------------------------------------------
#
# Jupyter and tensorboard listen, inside the container, on its docker-network
# address only: the published ports reach them there, while the researcher's
# VPN address (wg0) stays closed to the nodes.


def check_web_host(host: str, expose: bool, source: str = "--host") -> str:
    """Accept the address Jupyter and tensorboard are published on.

    A loopback address keeps them on this machine. Any other one (0.0.0.0, a
    LAN address) lets other machines reach them, so it needs `expose`; refused
    otherwise, before anything changes.
    """
    text = str(host).strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise BadInput(
            f"{source} {text!r} is not an IPv4 address; give an address of this "
            f"machine, e.g. 127.0.0.1 (the default) or its LAN address"
        ) from None
    if address.version != 4:
        raise BadInput(
            f"{source} {text}: only IPv4 addresses can be given; use 127.0.0.1, "
            f"0.0.0.0 or one of this machine's IPv4 addresses"
        )
    if address.is_loopback or expose:
        return text
    where = "every address of this machine" if address.is_unspecified else text
    raise BadInput(
        f"{source} {text} would publish Jupyter and tensorboard on {where}, open "
        f"to other machines: Jupyter runs any code as the container's user for "
        f"whoever reaches its port with the token, and tensorboard asks for no "
        f"token at all. Nothing was changed. If only trusted machines can reach "
        f"that address, confirm with --expose (or fbm.researcher.expose: true); "
        f"otherwise keep 127.0.0.1 and connect through an SSH tunnel "
        f"(ssh -L 8888:127.0.0.1:8888 THIS-MACHINE)"
    )


def parse_bindings(text: str) -> dict[int, tuple[str, int]]:
    """Container TCP port -> (host address, host port), from the JSON of
    `docker inspect -f '{{json .HostConfig.PortBindings}}'`."""
    try:
        value = json.loads(text or "null") or {}
    except ValueError:
        return {}
    found = {}
    for key, entries in value.items():
        port, _, proto = key.partition("/")
        if proto == "tcp" and entries:
            entry = entries[0]
            found[int(port)] = (
                entry.get("HostIp") or "0.0.0.0",
                int(entry.get("HostPort") or port),
            )
    return found


def parse_addresses(text: str) -> list[str]:
    """The IPv4 addresses in the output of `ip -o -4 addr show`."""
    return re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", text or "")


def web_bindings(stack) -> dict[int, tuple[str, int]]:
    """Where the researcher container publishes its ports ({} if absent)."""
    probe = _inspect(stack, "researcher", "{{json .HostConfig.PortBindings}}")
    return parse_bindings(probe.stdout) if probe.ok else {}


def check_local_address(stack, host: str) -> None:
    """Refuse an address the researcher's machine does not have (docker would
    fail only after removing the old container)."""
    address = ipaddress.ip_address(host)
    if address.is_loopback or address.is_unspecified:
        return
    probe = stack.host.probe(["ip", "-o", "-4", "addr", "show"])
    known = parse_addresses(probe.stdout) if probe.ok else []
    if known and host not in known:
        raise BadInput(
            f"{host} is not an address of the researcher's machine (it has "
            f"{', '.join(known)}); give one of these, or 0.0.0.0 for all of them"
        )


def publish_researcher(
    stack, host: str, *, expose=False, source="--host", always=False
) -> bool:
    """Publish the researcher's Jupyter and tensorboard ports on `host`.

    Checks first (see `check_web_host`, `check_local_address`); then starts
    the container when it is stopped or published elsewhere (compose
    recreates it: the VPN config and the Fed-BioMed component live on the
    mounts and stay; Jupyter and tensorboard must be started again), or
    always with `always`. True when the container was started or recreated.
    """
    host = check_web_host(host, expose, source)
    check_local_address(stack, host)
    # What compose publishes comes from the settings: this call's choice wins.
    res = {**stack.settings["researcher"], "host": host, "expose": bool(expose)}
    stack.settings.raw["researcher"] = res
    before = web_bindings(stack).get(JUPYTER_PORT, (None, 0))[0]
    if not always and before == host and stack.state("researcher") == "running":
        return False
    moving = before is not None and before != host
    if moving:
        stack.say(
            f"researcher: publishing Jupyter and tensorboard on {host} instead of "
            f"{before}: recreating the container (VPN config and Fed-BioMed "
            f"component stay; start Jupyter and tensorboard again)"
        )
    stack.up("researcher")
    if stack.host.dry:
        return True
    after = web_bindings(stack).get(JUPYTER_PORT, (None, 0))[0]
    if after != host:
        raise EngineError(
            f"the researcher's ports are published on {after}, not {host}; see "
            f"`docker port {stack.container('researcher')}`"
        )
    server_ip = stack.settings["vpn"]["server_ip"]
    if moving and not stack.wait_ping("researcher", server_ip):
        stack.say(
            f"warning: the recreated researcher does not reach the VPN server "
            f"{server_ip} yet; check `invoke status`"
        )
    return True


def web_url(stack, port: int, path: str = "") -> str:
    """The address a browser on this machine uses for a container port."""
    res = stack.settings["researcher"]
    fallback = {
        JUPYTER_PORT: int(res["jupyter_port"]),
        TENSORBOARD_PORT: int(res["tensorboard_port"]),
    }
    host, published = web_bindings(stack).get(
        port, (res["host"], fallback.get(port, port))
    )
    if ipaddress.ip_address(host).is_unspecified:
        host = "127.0.0.1"
    return f"http://{host}:{published}/{path}"


def exposure_warning(stack) -> str | None:
    """A warning when the researcher's web ports are open to other machines."""
    bindings = web_bindings(stack)
    host = bindings.get(JUPYTER_PORT, ("127.0.0.1", 0))[0]
    if ipaddress.ip_address(host).is_loopback:
        return None
    where = "every address of this machine" if host == "0.0.0.0" else host
    ports = f"{bindings[JUPYTER_PORT][1]} and {bindings[TENSORBOARD_PORT][1]}"
    return (
        f"warning: Jupyter and tensorboard (ports {ports}) are published on "
        f"{where}. Whoever reaches Jupyter with its token runs code as the "
        f"container's user; tensorboard needs no token. Keep these ports behind "
        f"a firewall that lets only trusted machines in, or go back to this "
        f"machine only with `invoke researcher.up --host 127.0.0.1`."
    )


def container_address(stack, name: str = "researcher") -> str:
    """The container's address on its docker network (where published ports
    arrive), never its VPN address."""
    template = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    probe = _inspect(stack, name, template)
    found = (probe.stdout or "").split() if probe.ok else []
    if not found:
        raise EngineError(
            f"cannot read the docker-network address of {name}; check "
            f"`docker inspect {stack.container(name)}` and `invoke status`"
        )
    return found[0]


def _wait_listening(stack, address, port, running, log_file, what, timeout) -> None:
    """Wait until `address:port` accepts connections inside the researcher."""
    check = f"import socket; socket.create_connection(({address!r}, {port}), 2)"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _probe(stack, "researcher", ["python3", "-c", check]).ok:
            return
        if not running(stack):
            break
        time.sleep(1)
    logs = _probe(stack, "researcher", ["tail", "-n", "15", log_file])
    raise EngineError(
        f"{what} did not start in the researcher; last lines of {log_file}:\n"
        f"{(logs.stdout or '').strip()}"
    )


def jupyter_running(stack) -> bool:
    found = _probe(stack, "researcher", ["pgrep", "-f", "bin/jupyter-notebook"])
    return found.ok


def start_jupyter(stack, timeout: float = 90) -> str | None:
    """Start Jupyter in the researcher with a new token; return its URL.

    None when Jupyter runs already (its token was shown when it started). The
    token goes to the container through stdin into a 0600 file, never on a
    command line. Jupyter listens on the container's docker-network address
    only, so the published port reaches it and the VPN does not.
    """
    ensure_researcher(stack)
    if jupyter_running(stack):
        return None
    address = container_address(stack)
    token = secrets.token_urlsafe(32)
    keep = 'umask 077 && cat >"$0"'
    written = _run(
        stack, "researcher", ["sh", "-c", keep, JUPYTER_TOKEN_FILE], stdin=token
    )
    if not written.ok:
        raise EngineError(f"cannot store the Jupyter token:\n{_tail(written)}")

    # Jupyter reads the token from its environment, set here from the file.
    script = (
        'token=$1 log=$2; shift 2; JUPYTER_TOKEN="$(cat "$token")"; '
        'export JUPYTER_TOKEN; exec "$@" >>"$log" 2>&1'
    )
    argv = ["sh", "-c", script, "sh", JUPYTER_TOKEN_FILE, JUPYTER_LOG]
    argv += [JUPYTER, "notebook", "--no-browser", f"--ip={address}"]
    argv += [f"--port={JUPYTER_PORT}", "--notebook-dir=/fbm"]
    if stack.settings.identity.uid == 0:
        argv.append("--allow-root")
    command = exec_argv(
        stack,
        "researcher",
        argv,
        env=researcher_env(stack),
        detach=True,
        workdir="/fbm",
    )
    result = stack.host.run(command, hide="both", warn=True)
    if not result.ok:
        raise EngineError(f"starting Jupyter failed:\n{_tail(result)}")
    url = web_url(stack, JUPYTER_PORT, f"tree?token={token}")
    if not stack.host.dry:
        _wait_listening(
            stack,
            address,
            JUPYTER_PORT,
            jupyter_running,
            JUPYTER_LOG,
            "Jupyter",
            timeout,
        )
    return url


def tensorboard_running(stack) -> bool:
    pattern = f"--logdir {TENSORBOARD_LOGDIR}"
    found = _probe(stack, "researcher", ["pgrep", "-f", "--", pattern])
    return found.ok


def start_tensorboard(stack, timeout: float = 120) -> tuple[str, bool]:
    """Start tensorboard on Fed-BioMed's experiment folder; return its URL and
    whether it was started (False: it runs already).

    Experiments run with `tensorboard=True` write there, one sub-folder each.
    Like Jupyter, it listens on the container's docker-network address only.
    """
    ensure_researcher(stack)
    url = web_url(stack, TENSORBOARD_PORT)
    if tensorboard_running(stack):
        return url, False
    address = container_address(stack)
    made = _run(stack, "researcher", ["mkdir", "-p", TENSORBOARD_LOGDIR])
    if not made.ok and not stack.host.dry:
        raise EngineError(f"cannot create {TENSORBOARD_LOGDIR}:\n{_tail(made)}")

    script = 'log=$1; shift; exec "$@" >>"$log" 2>&1'
    argv = ["sh", "-c", script, "sh", TENSORBOARD_LOG, f"{VENV}/bin/tensorboard"]
    argv += ["--logdir", TENSORBOARD_LOGDIR, "--host", address]
    argv += ["--port", str(TENSORBOARD_PORT)]
    command = exec_argv(stack, "researcher", argv, detach=True, workdir=RESEARCHER_ROOT)
    result = stack.host.run(command, hide="both", warn=True)
    if not result.ok:
        raise EngineError(f"starting tensorboard failed:\n{_tail(result)}")
    if not stack.host.dry:
        _wait_listening(
            stack,
            address,
            TENSORBOARD_PORT,
            tensorboard_running,
            TENSORBOARD_LOG,
            "tensorboard",
            timeout,
        )
    return url, True


def list_samples(stack) -> tuple[str, list[str]]:
    """The researcher's samples folder on its machine (made if missing) and
    the scripts and notebooks in it, relative to it."""
    folder = str(stack.run_mounts("researcher") / "samples")
    stack.host.mkdir(folder)
    argv = ["find", folder, "-name", ".ipynb_checkpoints", "-prune", "-o"]
    argv += ["-type", "f", "(", "-name", "*.py", "-o", "-name", "*.ipynb", ")"]
    found = stack.host.probe([*argv, "-print"])
    lines = (found.stdout or "").splitlines() if found.ok else []
    return folder, sorted(posixpath.relpath(line, folder) for line in lines if line)


def run_script(stack, path: str, args=(), *, hide=False):
    """Run a Python script or execute a notebook inside the researcher.

    The file must be inside the researcher's mounts (samples, data or fbm
    folder); a relative path is relative to the samples folder. Notebooks are
    executed into NAME.out.ipynb beside them.
    """
    mounts = researcher_mounts(stack)
    target = container_path(path, mounts)
    require_running(stack, "researcher")
    info = inspect_path(stack, "researcher", target, *(c for _, c in mounts))
    if not info["file"] or not info["inside"]:
        raise BadInput(
            f"{path} is not a file in the researcher's folders ({target}); put it "
            f"under {mounts[0][0]}"
        )
    suffix = PurePosixPath(target).suffix
    if suffix not in (".py", ".ipynb"):
        raise BadInput(f"{path}: give a Python script (.py) or a notebook (.ipynb)")
    if suffix == ".ipynb" and args:
        raise BadInput(
            f"{path} is a notebook: it takes no arguments (set values in a cell, "
            f"or run a .py script with --args)"
        )
    ensure_researcher(stack)
    if suffix == ".py":
        argv = [PYTHON, target, *args]
    else:
        output = PurePosixPath(target).stem + ".out.ipynb"
        argv = [JUPYTER, "nbconvert", "--to", "notebook", "--execute"]
        argv += ["--ExecutePreprocessor.timeout=-1", "--output", output, target]
    workdir = str(PurePosixPath(target).parent)
    command = exec_argv(
        stack, "researcher", argv, env=researcher_env(stack), workdir=workdir
    )
    result = stack.host.run(command, hide=hide, warn=True)
    if not result.ok and not stack.host.dry:
        detail = "" if not hide else f":\n{_tail(result, 12)}"
        raise EngineError(
            f"{path} failed in the researcher (exit {result.exited}){detail}"
        )
    return result


# -- the demo -------------------------------------------------------------------

DEMO_TAG = "fbm-vpn-demo"
DEMO_DIR = "/fbm/demo"
DEMO_DATA = "demo/breast-cancer.csv"
DEMO_PLAN = "fbm-vpn demo: breast cancer, SGDClassifier"

# Runs in a node (its venv): this node's share of scikit-learn's bundled breast
# cancer data, standardised locally as each hospital would, written as CSV.
DEMO_DATA_SCRIPT = r"""
import sys
from pathlib import Path
from sklearn.datasets import load_breast_cancer

part, parts, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
frame = load_breast_cancer(as_frame=True).frame
frame = frame.sample(frac=1.0, random_state=7).iloc[part::parts]
features = frame.columns[:-1]
frame[features] = (frame[features] - frame[features].mean()) / frame[features].std()
out.parent.mkdir(parents=True, exist_ok=True)
frame.to_csv(out, index=False)
print(len(frame))
"""

# Runs in the researcher: the federated experiment (logistic regression with
# scikit-learn's SGDClassifier, averaged by FedAvg). `--request-approval` only
# sends the training plan to the nodes for approval.
DEMO_EXPERIMENT = r'''"""fbm-vpn demo: federated logistic regression over the VPN."""

import argparse
import json
import os

from fedbiomed.common.datamanager import DataManager
from fedbiomed.common.dataset import TabularDataset
from fedbiomed.common.training_plans import FedSGDClassifier

FEATURES = 30


class BreastCancerPlan(FedSGDClassifier):
    def init_dependencies(self):
        return ["from fedbiomed.common.dataset import TabularDataset"]

    def training_data(self):
        dataset = TabularDataset(
            input_columns=list(range(30)), target_columns=[30]
        )
        return DataManager(dataset=dataset, shuffle=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--description", default="fbm-vpn demo")
    parser.add_argument("--request-approval", action="store_true")
    parser.add_argument("--model", default="aggregated-model.pkl")
    args = parser.parse_args()

    from fedbiomed.researcher.aggregators.fedavg import FedAverage
    from fedbiomed.researcher.federated_workflows import Experiment

    exp = Experiment(
        tags=[args.tag],
        model_args={
            "n_features": FEATURES,
            "n_classes": 2,
            "loss": "log_loss",
            "learning_rate": "constant",
            "eta0": 0.05,
        },
        training_plan_class=BreastCancerPlan,
        training_args={"num_updates": 20, "loader_args": {"batch_size": 16}},
        round_limit=args.rounds,
        aggregator=FedAverage(),
        node_selection_strategy=None,
    )
    nodes = sorted(exp.training_data().node_ids())
    if args.request_approval:
        replies = exp.training_plan_approve(args.description)
        sent = sorted(n for n, r in replies.items() if r and r.get("success"))
        print("DEMO-APPROVAL " + json.dumps({"nodes": nodes, "sent": sent}))
        return
    exp.run()
    replies = {
        str(rnd): sorted(by_node) for rnd, by_node in exp.training_replies().items()
    }
    exp.training_plan().export_model(args.model)
    result = {
        "nodes": nodes,
        "replies": replies,
        "aggregated_rounds": sorted(str(r) for r in exp.aggregated_params()),
        "model": os.path.abspath(args.model),
        "model_bytes": os.path.getsize(args.model),
    }
    print("DEMO-RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
'''


@dataclass
class DemoReport:
    """What the demo saw: node ids, replies per round, the model, the traffic."""

    researcher: str = f"{RESEARCHER_IP}:{RESEARCHER_PORT}"
    node_ids: dict = field(default_factory=dict)
    vpn_ips: dict = field(default_factory=dict)
    replies: dict = field(default_factory=dict)
    aggregated_rounds: list = field(default_factory=list)
    model: str = ""
    model_bytes: int = 0
    connections: dict = field(default_factory=dict)
    tunnel_bytes: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def problems(self, rounds: int) -> list[str]:
        """Everything that falls short of: every node trained every round."""
        found = []
        if len(self.replies) < rounds:
            found.append(f"{len(self.replies)} round(s) of replies, {rounds} wanted")
        for name, ident in self.node_ids.items():
            missing = [r for r, ids in self.replies.items() if ident not in ids]
            if missing:
                found.append(f"{name} sent no training reply in round(s) {missing}")
            if self.researcher not in self.connections.get(name, []):
                found.append(f"{name}'s log shows no connection to {self.researcher}")
        if len(self.aggregated_rounds) < rounds:
            found.append("the aggregated parameters miss rounds")
        if self.model_bytes <= 0:
            found.append("no aggregated model file")
        return found


def demo_data(stack, name: str, part: int, parts: int) -> int:
    """Write this node's part of the demo dataset; return its row count."""
    target = f"{DATA}/{DEMO_DATA}"
    argv = [PYTHON, "-c", DEMO_DATA_SCRIPT, str(part), str(parts), target]
    result = _run(stack, name, argv)
    if stack.host.dry:
        return 0
    if not result.ok:
        raise EngineError(f"writing the demo data in {name} failed:\n{_tail(result)}")
    return int((result.stdout or "0").split()[-1])


def put_file(stack, name: str, target: str, text: str) -> None:
    """Write a file in a container as the run-time account (via stdin)."""
    script = 'mkdir -p "$(dirname "$0")" && cat >"$0"'
    result = _run(stack, name, ["sh", "-c", script, target], stdin=text)
    if not result.ok and not stack.host.dry:
        raise EngineError(f"cannot write {target} in {name}:\n{_tail(result)}")


def demo_experiment(stack, *args: str) -> dict:
    """Run the demo experiment script; return the JSON line it ends with."""
    argv = [PYTHON, f"{DEMO_DIR}/experiment.py", "--tag", DEMO_TAG, *args]
    command = exec_argv(
        stack, "researcher", argv, env=researcher_env(stack), workdir=DEMO_DIR
    )
    result = stack.host.run(command, hide="both", warn=True)
    if stack.host.dry:
        return {}
    marker = "DEMO-APPROVAL " if "--request-approval" in args else "DEMO-RESULT "
    lines = [x for x in (result.stdout or "").splitlines() if x.startswith(marker)]
    if not result.ok or not lines:
        raise EngineError(
            f"the demo experiment failed in the researcher (exit {result.exited}):\n"
            f"{_tail(result, 15)}\nsee `invoke node.logs` and `invoke researcher.logs`"
        )
    return json.loads(lines[-1][len(marker) :])


def each_node(nodes, step):
    """Run `step(name)` for every node at once (Fed-BioMed's command line
    spends seconds importing; nodes are independent); return the results."""
    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        futures = {name: pool.submit(step, name) for name in nodes}
    return {name: future.result() for name, future in futures.items()}


def run_demo(stack, nodes=NODES, rounds: int = 2) -> DemoReport:
    """Datasets on the nodes, nodes started, the experiment run from the
    researcher over the VPN; the VPN itself must be up (see the demo task)."""
    report = DemoReport(researcher=f"{researcher_ip(stack)}:{RESEARCHER_PORT}")
    clock = time.monotonic()

    def prepare(name):
        part = list(nodes).index(name)
        rows = demo_data(stack, name, part, len(nodes))
        known = [] if ensure_node(stack, name) else list_datasets(stack, name)
        if any(DEMO_TAG in d["tags"] for d in known):
            stack.say(f"{name}: demo dataset present ({rows} rows rewritten)")
        else:
            add_dataset(
                stack,
                name,
                DEMO_DATA,
                DEMO_TAG,
                kind="csv",
                data_name="breast-cancer",
                description=f"breast cancer data, part {part + 1} of {len(nodes)}",
                datasets=known,
            )
        start_node(stack, name)
        return node_id(stack, name)

    report.node_ids = each_node(nodes, prepare)
    report.vpn_ips = {name: stack.vpn_ip(name) for name in nodes}
    report.seconds["nodes"] = round(time.monotonic() - clock, 1)

    clock = time.monotonic()
    ensure_researcher(stack)
    put_file(stack, "researcher", f"{DEMO_DIR}/experiment.py", DEMO_EXPERIMENT)
    stack.say("researcher: asking the nodes to approve the demo training plan")
    demo_experiment(stack, "--request-approval", "--description", DEMO_PLAN)

    def approve(name):
        plans = list_plans(stack, name)
        waiting = pending_plans(plans, DEMO_PLAN)
        for plan in waiting:
            approve_plan(stack, name, plan["training_plan_id"], plans)
        if not waiting:
            stack.say(f"{name}: no pending demo plan (approved before)")

    each_node(nodes, approve)
    report.seconds["approval"] = round(time.monotonic() - clock, 1)

    clock = time.monotonic()
    before = {name: wg_transfer(stack, name) for name in nodes}
    stack.say(f"researcher: federated training, {rounds} rounds")
    result = demo_experiment(stack, "--rounds", str(rounds))
    report.seconds["experiment"] = round(time.monotonic() - clock, 1)
    if stack.host.dry:
        return report
    report.replies = result["replies"]
    report.aggregated_rounds = result["aggregated_rounds"]
    report.model = result["model"]
    report.model_bytes = result["model_bytes"]
    for name in nodes:
        after = wg_transfer(stack, name)
        report.tunnel_bytes[name] = [
            a - b for a, b in zip(after, before[name], strict=True)
        ]
        report.connections[name] = researcher_connections(stack, name)
    log.debug("demo report: %s", report)
    return report
