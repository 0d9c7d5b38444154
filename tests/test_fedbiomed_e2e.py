"""Fed-BioMed end-to-end: a real federated training over the VPN.

`invoke demo` deploys vpnserver + node + node2 + researcher in an instance of
its own, gives each node a share of scikit-learn's breast cancer data, starts
Fed-BioMed on the nodes and trains from the researcher for two rounds. The
tests then check what the nodes and the researcher recorded, and feed bad
input to the Fed-BioMed tasks. The first tests below are pure logic (no mark).

Needs a Docker engine (scripts/test.sh starts it) and PyPI for the cold build
of the Fed-BioMed image; images use the `e2e` tag of tests/test_e2e_docker.py,
so whichever runs first builds them. Builds trust FBM_TEST_CA_BUNDLE (default:
the host's CA bundle), for HTTPS proxies.
"""

import ast
import json
import re
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

import pytest

from fbmvpn import fedbiomed
from fbmvpn.errors import BadInput
from stack_env import Instance, docker, require_engine

INSTANCE = "fbme2e"
PORT = "51896"
JUPYTER_PORT = "18896"

e2e = pytest.mark.fedbiomed


# -- pure logic -----------------------------------------------------------------

MOUNTS = [(PurePosixPath("/srv/fbm/node/run_mounts/data"), "/data")]


@pytest.mark.parametrize(
    "given, seen",
    [
        ("demo/a.csv", "/data/demo/a.csv"),
        ("./a/../b.csv", "/data/b.csv"),
        ("/srv/fbm/node/run_mounts/data/x/y.csv", "/data/x/y.csv"),
        ("/data/x.csv", "/data/x.csv"),
        ("/data", "/data"),
    ],
)
def test_container_path_maps_into_the_data_folder(given, seen):
    assert fedbiomed.container_path(given, MOUNTS) == seen


@pytest.mark.parametrize(
    "given", ["../x.csv", "a/../../x.csv", "/etc/passwd", "/srv/fbm/other.csv", " "]
)
def test_container_path_refuses_the_outside(given):
    with pytest.raises(BadInput):
        fedbiomed.container_path(given, MOUNTS)


def test_container_path_prefers_the_longest_mount():
    mounts = [
        ("/m/samples", "/fbm/notebooks/samples"),
        ("/m/data", "/data"),
        ("/m/fbm", "/fbm"),
    ]
    assert (
        fedbiomed.container_path("nb.ipynb", mounts)
        == "/fbm/notebooks/samples/nb.ipynb"
    )
    assert fedbiomed.container_path("/m/fbm/demo/x.py", mounts) == "/fbm/demo/x.py"
    assert (
        fedbiomed.container_path("/fbm/notebooks/samples/a.py", mounts)
        == "/fbm/notebooks/samples/a.py"
    )


LISTING = """
# \x1b[1;32mUsing component located at:\x1b[0m \x1b[1m/fbm/node\x1b[0m #
2026-12-03 13:44:00,253 fedbiomed INFO - Syslog configuration is disabled.
Listing your data available
name           data_type    tags                 description     shape
-------------  -----------  -------------------  --------------  ------------------
breast cancer  csv          ['demo-bc', 'x-12']  part 1 of 2     {'csv': [280, 31]}
images         images       ['img']                              {'images': 4}
2026-12-03 13:44:01,000 fedbiomed INFO - done
"""


def test_parse_table_reads_cells_with_spaces_and_empty_ones():
    rows = fedbiomed.parse_table(LISTING)

    assert [r["name"] for r in rows] == ["breast cancer", "images"]
    assert rows[0]["description"] == "part 1 of 2"
    assert rows[1]["description"] == ""
    assert rows[0]["shape"] == "{'csv': [280, 31]}"
    assert fedbiomed.parse_tags(rows[0]["tags"]) == ["demo-bc", "x-12"]


def test_parse_table_without_table():
    assert fedbiomed.parse_table("No data has been set up.\n") == []


@pytest.mark.parametrize(
    "text", ["", "ab", "ok-tag,xy", "has space", "q'uote", "abc,abc"]
)
def test_check_tags_refuses_what_fedbiomed_would(text):
    with pytest.raises(BadInput):
        fedbiomed.check_tags(text)


def test_tag_conflicts_follow_fedbiomed_rule():
    datasets = [
        {"name": "a", "tags": ["demo", "part1"]},
        {"name": "b", "tags": ["other"]},
    ]
    assert fedbiomed.tag_conflicts(["demo"], datasets) == ["a"]
    assert fedbiomed.tag_conflicts(["demo", "part1", "x"], datasets) == ["a"]
    assert fedbiomed.tag_conflicts(["demo", "part2"], datasets) == []


def test_fedbiomed_error_keeps_the_reason_not_the_traceback():
    class Result:
        stdout = (
            "Traceback (most recent call last):\n"
            '  File "x.py", line 3, in <module>\n'
            "fedbiomed.common.exceptions.FedbiomedDatasetError: FB632: Failed to "
            "instantiate MnistDataset\n"
        )
        stderr = ""
        exited = 1

    assert fedbiomed.fedbiomed_error(Result()) == (
        "FB632: Failed to instantiate MnistDataset"
    )
    Result.stdout = "Traceback...\nUnicodeDecodeError: 'utf-8' codec can't decode\n"
    assert fedbiomed.fedbiomed_error(Result()).startswith("UnicodeDecodeError:")


def test_demo_report_names_what_is_missing():
    report = fedbiomed.DemoReport(
        node_ids={"node": "N1", "node2": "N2"},
        replies={"0": ["N1", "N2"], "1": ["N1"]},
        aggregated_rounds=["0", "1"],
        model_bytes=10,
        connections={"node": ["10.222.0.2:50051"], "node2": []},
    )
    problems = report.problems(2)
    assert "node2 sent no training reply in round(s) ['1']" in problems
    assert "node2's log shows no connection to 10.222.0.2:50051" in problems
    assert len(problems) == 2


# -- the real thing ---------------------------------------------------------------


class Deployment(Instance):
    def __init__(self, mounts: Path):
        ports = dict(
            vpn=PORT,
            jupyter=JUPYTER_PORT,
            tensorboard=16896,
            gui_https=18446,
            gui_http=18486,
        )
        super().__init__(INSTANCE, mounts, ports)

    def data(self, name="node") -> Path:
        return self.mounts / name / "run_mounts" / "data"

    def datasets(self, name="node"):
        out = self.invoke(f"{name}.dataset-list", "--json").stdout
        return json.loads(out[out.index("[") :])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    require_engine()
    dep = Deployment(tmp_path_factory.mktemp("fbm-mounts"))
    # Cold: builds the Fed-BioMed image (minutes); warm: seconds.
    dep.demo = dep.invoke("demo", timeout=2400)
    yield dep
    dep.invoke("clean", "all", "--level", "config", "--datasets", "--yes", check=False)


@e2e
def test_both_nodes_trained_every_round(deployment):
    out = deployment.demo.stdout
    rounds = re.findall(r"^round (\d+): training replies from (.*)$", out, re.M)

    assert [r for r, _ in rounds] == ["1", "2"]
    for _, senders in rounds:
        assert sorted(senders.split(", ")) == ["node", "node2"]
    assert "demo passed: 2 nodes trained 2 rounds over the VPN" in out


@e2e
def test_aggregated_model_exists(deployment):
    model = deployment.mounts / "researcher/run_mounts/fbm/demo/aggregated-model.pkl"
    assert model.is_file() and model.stat().st_size > 0
    assert (
        f"aggregated model: /fbm/demo/aggregated-model.pkl ({model.stat().st_size}"
        in (deployment.demo.stdout)
    )


@e2e
@pytest.mark.parametrize(
    "name, address", [("node", "10.221.0."), ("node2", "10.221.0.")]
)
def test_node_logs_show_the_researcher_over_the_vpn(deployment, name, address):
    line = re.search(
        rf"^{name} \((\S+)\) -> researcher (\S+): (\d+) bytes sent",
        deployment.demo.stdout,
        re.M,
    )
    audit = deployment.invoke(f"{name}.logs", "--audit", "--tail", "2000").stdout
    app = deployment.invoke(f"{name}.logs", "--tail", "2000").stdout

    assert line and line.group(1).startswith(address)
    assert line.group(2) == "10.222.0.2:50051"
    assert int(line.group(3)) > 0
    assert "Successfully connected to researcher server at 10.222.0.2:50051" in audit
    assert "Training plan has been approved by the node" in app


@e2e
def test_demo_datasets_listed_with_their_share(deployment):
    shares = []
    for name in ("node", "node2"):
        demo = [d for d in deployment.datasets(name) if "fbm-vpn-demo" in d["tags"]]
        assert len(demo) == 1 and demo[0]["data_type"] == "csv"
        assert demo[0]["path"] == "/data/demo/breast-cancer.csv"
        shares.append(ast.literal_eval(demo[0]["shape"])["csv"][0])
    assert sum(shares) == 569  # every row of scikit-learn's dataset, split in two


@e2e
def test_dataset_add_list_remove_round_trip(deployment):
    source = deployment.data() / "demo" / "breast-cancer.csv"
    extra = deployment.data() / "extra" / "copy.csv"
    extra.parent.mkdir(exist_ok=True)
    extra.write_text(source.read_text())

    deployment.invoke("node.dataset-add", "extra/copy.csv", "--tag", "extra-set")
    listed = [d["name"] for d in deployment.datasets() if "extra-set" in d["tags"]]
    deployment.invoke("node.dataset-remove", "extra-set")

    assert listed == ["extra-set"]
    assert not [d for d in deployment.datasets() if "extra-set" in d["tags"]]
    assert extra.is_file()  # files stay


def gray_png(size: int, shade: int) -> bytes:
    """A size x size 8-bit grayscale PNG of one shade."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + bytes([shade]) * size for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def mnist_folder(root: Path, count: int = 12) -> None:
    """MNIST/raw/ with the four idx files, `count` 28x28 images each."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = struct.pack(">IIII", 0x803, count, 28, 28) + bytes(count * 28 * 28)
    labels = struct.pack(">II", 0x801, count) + bytes(i % 10 for i in range(count))
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(images)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)


@e2e
@pytest.mark.parametrize("kind", ["images", "mnist"])
def test_image_and_mnist_folders_are_added(deployment, kind):
    folder = deployment.data() / f"{kind}-set"
    if kind == "images":
        for label, shade in (("benign", 30), ("malignant", 220)):
            (folder / label).mkdir(parents=True)
            for i in range(3):
                (folder / label / f"{i}.png").write_bytes(gray_png(8, shade + i))
    else:
        mnist_folder(folder)

    deployment.invoke("node.dataset-add", f"{kind}-set", "--tag", f"{kind}-tag")
    added = [d for d in deployment.datasets() if f"{kind}-tag" in d["tags"]]
    deployment.invoke("node.dataset-remove", f"{kind}-tag")

    assert [d["data_type"] for d in added] == [fedbiomed.DATASET_TYPES[kind]]


@pytest.fixture(scope="module")
def datasets_before(deployment):
    """node's datasets before the refusals: each must leave them as they are."""
    return deployment.datasets()


def _refused(deployment, before, *args, message):
    result = deployment.invoke(*args, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert deployment.datasets() == before


@e2e
def test_dataset_path_missing_is_refused(deployment, datasets_before):
    _refused(
        deployment,
        datasets_before,
        "node.dataset-add",
        "nowhere.csv",
        "--tag",
        "abc-x",
        message="does not exist",
    )


@e2e
@pytest.mark.parametrize("path", ["/etc/passwd", "../secret.csv"])
def test_dataset_outside_the_data_folder_is_refused(deployment, datasets_before, path):
    _refused(
        deployment,
        datasets_before,
        "node.dataset-add",
        path,
        "--tag",
        "abc-x",
        message="is outside",
    )


@e2e
def test_dataset_link_leading_outside_is_refused(deployment, datasets_before):
    link = deployment.data() / "escape"
    if not link.is_symlink():
        link.symlink_to("/etc")
    _refused(
        deployment,
        datasets_before,
        "node.dataset-add",
        "escape",
        "--tag",
        "abc-x",
        message="outside node's data folder",
    )


@e2e
@pytest.mark.parametrize(
    "make, message",
    [
        ({"notes.txt": "hello"}, "a file that is not a .csv"),
        ({"empty-dir/readme.md": "x"}, "a folder with neither MNIST/raw/"),
        ({"header-only.csv": "a,b\n"}, "a CSV file with a header but no data row"),
    ],
)
def test_dataset_unsupported_format_is_refused(
    deployment, datasets_before, make, message
):
    for rel, text in make.items():
        path = deployment.data() / "bad" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    target = "bad/" + next(iter(make)).split("/")[0]
    _refused(
        deployment,
        datasets_before,
        "node.dataset-add",
        target,
        "--tag",
        "abc-x",
        message=f"unsupported dataset format at {target}: {message}",
    )


@e2e
def test_dataset_tag_already_used_is_refused(deployment, datasets_before):
    _refused(
        deployment,
        datasets_before,
        "node.dataset-add",
        "demo/breast-cancer.csv",
        "--tag",
        "fbm-vpn-demo",
        message="already used on node by dataset breast-cancer",
    )


@e2e
def test_training_plan_register_list_and_bad_ids(deployment):
    plan = deployment.data("node2") / "plans" / "tiny_plan.py"
    plan.parent.mkdir(exist_ok=True)
    plan.write_text("import numpy as np\n\n\nclass TinyPlan:\n    steps = 3\n")

    deployment.invoke(
        "node2.training-plan-register", "plans/tiny_plan.py", "--plan-name", "tiny"
    )
    listed = json.loads(deployment.invoke("node2.training-plan-list", "--json").stdout)
    again = deployment.invoke(
        "node2.training-plan-register",
        "plans/tiny_plan.py",
        "--plan-name",
        "tiny",
        check=False,
    )
    unknown = deployment.invoke(
        "node2.training-plan-approve", "training_plan_nope", check=False
    )

    tiny = [p for p in listed if p["name"] == "tiny"]
    assert tiny and tiny[0]["training_plan_status"] == "Approved"
    assert again.returncode == 1 and "exists on node2" in again.stderr
    assert unknown.returncode == 1 and "no training plan" in unknown.stderr


@e2e
def test_researcher_runs_scripts_and_notebooks_from_samples(deployment):
    samples = deployment.mounts / "researcher" / "run_mounts" / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    (samples / "hello.py").write_text(
        "import sys\nimport fedbiomed.researcher\nprint('hello', sys.argv[1])\n"
    )

    cell = {
        "cell_type": "code",
        "execution_count": None,
        "metadata": {},
        "outputs": [],
        "source": ["import fedbiomed\n", "print('notebook ran', fedbiomed.__name__)"],
    }
    notebook = {
        "cells": [cell],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (samples / "hello.ipynb").write_text(json.dumps(notebook))

    ran = deployment.invoke("researcher.run", "hello.py", "--args", "vpn")
    executed = deployment.invoke("researcher.run", "hello.ipynb")
    outside = deployment.invoke("researcher.run", "/etc/hostname", check=False)

    assert "hello vpn" in ran.stdout
    assert executed.returncode == 0
    assert "notebook ran fedbiomed" in (samples / "hello.out.ipynb").read_text()
    assert outside.returncode == 1 and "is outside" in outside.stderr


@e2e
def test_jupyter_token_printed_once_and_required(deployment):
    first = deployment.invoke("researcher.jupyter")
    second = deployment.invoke("researcher.jupyter")

    urls = re.findall(r"^Jupyter: (\S+)$", first.stdout, re.M)
    assert len(urls) == 1 and "token=" in urls[0]
    assert urls[0].startswith(f"http://127.0.0.1:{JUPYTER_PORT}/")
    assert "token=" not in second.stdout and "runs already" in second.stdout
    token = urls[0].split("token=")[1]
    assert first.stdout.count(token) == 1 and token not in first.stderr
    api = f"http://127.0.0.1:{JUPYTER_PORT}/api/contents"
    with urllib.request.urlopen(f"{api}?token={token}", timeout=10) as answer:
        assert answer.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(api, timeout=10)
    assert refused.value.code in (401, 403)


@e2e
def test_node_start_without_vpn_says_so_at_once(deployment):
    deployment.invoke("node.stop")
    docker("stop", deployment.container("vpnserver"))
    try:
        result = deployment.invoke("node.start", check=False, timeout=120)
        assert result.returncode == 1
        assert "the VPN of node is not up" in result.stderr
        assert "invoke peer.join node" in result.stderr
    finally:
        deployment.invoke("vpnserver.up")


@e2e
def test_node_start_gpu_on_a_cpu_container_is_refused(deployment):
    result = deployment.invoke("node.start", "--gpu", check=False, timeout=120)

    assert result.returncode == 1
    assert "runs without the GPU runtime" in result.stderr
    assert "invoke node.up --gpu" in result.stderr
