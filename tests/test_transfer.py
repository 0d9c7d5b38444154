"""Image transfer to a node machine: a real sshd in front of a second Docker engine.

The build engine is this machine's; the node engine is a second dockerd with
its own store (tests/remote_fixtures.py), reached through sshd (SetEnv
DOCKER_HOST) or directly through its socket. The images are small ones made
here from random bytes (`docker import`, then COPY layers), so each run's
layers are new to the node engine. Every check reads the node engine through
its own socket, not through the code under test.
"""

import json
import os
import re
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from fbmvpn import transfer
from fbmvpn.errors import EngineError, StateError
from fbmvpn.host import Outcome
from remote_fixtures import free_port, node_engine, node_sshd  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.docker]

REPO = "fbmtest/transfer"
LABEL = "org.fedbiomed.test=transfer"
# One run of the tests: its bytes, hence its layers, are new to every engine.
RUN_ID = uuid.uuid4().hex[:12]


def docker(*args, check=True, **kwargs):
    return subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=600,
        **kwargs,
    )


class Builder:
    """Makes small images on the build engine, and removes them afterwards.

    The root image holds 3 MB of random bytes and 4 MB of text (one layer,
    made with `docker import`); others add one COPY layer per file to it.
    """

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.tags: list[str] = []
        self.root = f"{REPO}:root-{RUN_ID}"
        context = workdir / "root"
        context.mkdir()
        (context / "random.bin").write_bytes(os.urandom(3_000_000))
        line = f"fbm transfer test {RUN_ID}\n".encode()
        (context / "text.txt").write_bytes(line * (4_000_000 // len(line)))
        archive = subprocess.run(
            ["tar", "-C", str(context), "-c", "."], capture_output=True, check=True
        ).stdout
        subprocess.run(
            ["docker", "import", "--change", f"LABEL {LABEL}", "-", self.root],
            input=archive,
            capture_output=True,
            check=True,
        )
        self.tags.append(self.root)

    def build(self, tag: str, files: dict[str, bytes], base: str | None = None) -> str:
        context = self.workdir / tag.replace("/", "_").replace(":", "_")
        context.mkdir(exist_ok=True)
        lines = [f"FROM {base or self.root}", f"LABEL {LABEL}"]
        for name, data in files.items():
            (context / name).write_bytes(data)
            lines.append(f"COPY {name} /{name}")
        (context / "Dockerfile").write_text("\n".join(lines) + "\n")
        docker("build", "-q", "-t", tag, str(context))
        self.tags.append(tag)
        return image_id(tag)

    def cleanup(self) -> None:
        for tag in reversed(self.tags):
            docker("image", "rm", tag, check=False)
        docker("image", "prune", "-f", "--filter", f"label={LABEL}", check=False)


def image_id(ref: str) -> str:
    return docker("image", "inspect", "-f", "{{.Id}}", ref).stdout.strip()


def text(label: str) -> dict[str, bytes]:
    """One small file whose content is new to this run."""
    return {f"{label}.txt": f"{RUN_ID} {label}\n".encode()}


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    made = Builder(tmp_path_factory.mktemp("images"))
    yield made
    made.cleanup()


@pytest.fixture
def node(node_sshd):  # noqa: F811
    """The node machine as a transfer target, over SSH."""
    with node_sshd.connect() as connection:
        yield transfer.SshTarget(connection)


def node_chains(engine) -> set[str]:
    """Chain IDs the node engine holds, read straight from its socket."""
    ids = engine.docker("image", "ls", "-a", "-q", "--no-trunc").stdout.split()
    if not ids:
        return set()
    out = engine.docker(
        "image", "inspect", "-f", "{{json .RootFS.Layers}}", *set(ids)
    ).stdout
    return {
        c for line in out.splitlines() for c in transfer.chain_ids(json.loads(line))
    }


def layers_of(ref: str) -> list[str]:
    return json.loads(
        docker("image", "inspect", "-f", "{{json .RootFS.Layers}}", ref).stdout
    )


def dangling(engine) -> list[str]:
    return engine.docker("image", "ls", "-q", "-f", "dangling=true").stdout.split()


@pytest.fixture(scope="module")
def shipped(builder, node_engine, node_sshd):  # noqa: F811
    """The first transfer: an image the node engine lacks, through sshd."""
    tag = f"{REPO}:app"
    built = builder.build(tag, text("one"))
    assert node_engine.image_id(tag) is None
    assert not set(transfer.chain_ids(layers_of(tag))) & node_chains(node_engine)
    lines: list[str] = []
    with node_sshd.connect() as connection:
        result = transfer.transfer_image(
            tag, transfer.SshTarget(connection), status=lines.append
        )
    return result, built, lines


def test_ships_an_image_the_node_lacks(shipped, node_engine):  # noqa: F811
    result, built, lines = shipped

    assert node_engine.image_id(f"{REPO}:app") == built
    tags = node_engine.docker("image", "inspect", "-f", "{{json .RepoTags}}", built)
    assert json.loads(tags.stdout) == [f"{REPO}:app"]
    assert (result.image_id, result.mode, result.source) == (built, "full", "store")
    assert (result.layers_sent, result.layers_total) == (2, 2)
    # 7 MB of files in tar form; the 4 MB of text compress, the random 3 MB not.
    assert 7_000_000 < result.raw_bytes < 7_100_000
    assert 3_000_000 < result.sent_bytes < 3_300_000
    assert lines == [result.summary()]
    assert lines[0].startswith(
        f"{REPO}:app -> {result.target}: sent 2 of 2 layers, 3.0 MB compressed "
        "(7.0 MB raw) in "
    )
    assert lines[0].endswith(f"s; image {built[7:19]} loaded and checked")


def test_one_layer_rebuild_sends_that_layer_only(shipped, builder, node, node_engine):  # noqa: F811
    first, old_id, _ = shipped
    tag = f"{REPO}:app"
    new_id = builder.build(tag, text("two"))
    assert new_id != old_id

    result = transfer.transfer_image(tag, node, status=None)

    assert (result.mode, result.source) == ("partial", "store")
    assert (result.layers_sent, result.layers_total) == (1, 2)
    # One small file in a layer tar, the manifest and the config.
    assert result.raw_bytes < 10_000
    assert result.sent_bytes * 1000 < first.sent_bytes
    assert node_engine.image_id(tag) == new_id


def test_same_image_again_sends_nothing(shipped, node, node_engine):  # noqa: F811
    tag = f"{REPO}:app"
    before = node_engine.image_id(tag)
    lines: list[str] = []

    result = transfer.transfer_image(tag, node, status=lines.append)

    assert result.mode == "skipped"
    assert (result.sent_bytes, result.raw_bytes, result.layers_sent) == (0, 0, 0)
    assert node_engine.image_id(tag) == before == result.image_id
    assert lines == [
        f"{tag} -> {node.name}: already there (image {before[7:19]}); nothing sent"
    ]


def test_same_image_under_a_new_tag_is_only_tagged(shipped, node, node_engine):  # noqa: F811
    tag = f"{REPO}:app"
    present = node_engine.image_id(tag)

    result = transfer.transfer_image(tag, node, tags=[f"{REPO}:alias"], status=None)

    assert (result.mode, result.sent_bytes) == ("tagged", 0)
    assert node_engine.image_id(f"{REPO}:alias") == present


def test_docker_save_stream_is_filtered_to_the_new_layer(
    shipped,
    builder,
    node,
    node_engine,  # noqa: F811
):
    tag = f"{REPO}:save"
    built = builder.build(tag, text("save"))

    result = transfer.transfer_image(tag, node, source="save", status=None)

    assert (result.source, result.mode) == ("save", "partial")
    assert (result.layers_sent, result.layers_total) == (1, 2)
    # The 7 MB root layer stayed out; the legacy layout's small files are left.
    assert result.raw_bytes < 20_000
    assert node_engine.image_id(tag) == built


def test_second_engine_reached_directly_through_docker_host(
    shipped,
    builder,
    node_engine,  # noqa: F811
    capsys,
):
    tag = f"{REPO}:local"
    built = builder.build(tag, text("local"))
    target = transfer.LocalTarget(node_engine.docker_host)

    result = transfer.transfer_image(tag, target, status=None, progress=True)

    assert (result.mode, result.layers_sent) == ("partial", 1)
    assert node_engine.image_id(tag) == built
    # tqdm's bar on stderr (cleared at the end, the status line follows it).
    bar = capsys.readouterr().err
    desc = re.escape(f"{tag} -> local engine {node_engine.docker_host}:")
    assert re.search(rf"\r{desc} +\d+%\|", bar), bar


def test_no_progress_bar_when_stderr_is_not_a_terminal(shipped, builder, node, capsys):
    tag = f"{REPO}:quiet"
    builder.build(tag, text("quiet"))

    result = transfer.transfer_image(tag, node, status=None)

    assert result.layers_sent == 1
    assert capsys.readouterr() == ("", "")


def test_interrupted_transfer_leaves_nothing_and_a_retry_works(
    shipped,
    builder,
    node,
    node_engine,  # noqa: F811
    node_sshd,  # noqa: F811
):
    tag = f"{REPO}:big"
    # 24 MB of random bytes: a layer gzip cannot shrink, long enough to cut.
    built = builder.build(tag, {"blob.bin": os.urandom(24_000_000)})
    dangling_before = dangling(node_engine)
    killed = []

    def cut_after_2mb(sent: int) -> None:
        if sent > 2_000_000 and not killed:
            killed.append(node_sshd.kill_sessions())

    with pytest.raises(EngineError) as failure:
        transfer.transfer_image(tag, node, status=None, on_chunk=cut_after_2mb)

    assert killed and killed[0] >= 1
    message = str(failure.value)
    assert message.startswith(
        f"the transfer of {tag} to {node.name} was interrupted after "
    )
    assert "; the target holds no partial image of it; run the transfer again" in (
        message
    )
    assert node_engine.image_id(tag) is None
    assert node_engine.image_id(built) is None
    assert dangling(node_engine) == dangling_before

    retry = transfer.transfer_image(tag, node, status=None)

    assert (retry.mode, retry.layers_sent) == ("partial", 1)
    assert retry.raw_bytes > 24_000_000
    assert node_engine.image_id(tag) == built


class Proxy:
    """A target that passes everything to another one, for fault injection."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.streams = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open_stream(self, argv):
        self.streams += 1
        return self.inner.open_stream(argv)


def test_partial_archive_refused_falls_back_to_the_full_image(
    shipped,
    builder,
    node,
    node_engine,  # noqa: F811
):
    parent, child = f"{REPO}:fb-base", f"{REPO}:fb"
    builder.build(parent, text("fb-base"))
    transfer.transfer_image(parent, node, status=None)
    child_id = builder.build(child, text("fb"), base=parent)

    class StoreChangesUnderfoot(Proxy):
        # The node's store loses the parent's layer between the look and the load:
        # the partial archive then lacks a layer the node needs.
        def open_stream(self, argv):
            if self.streams == 0:
                node_engine.docker("image", "rm", parent)
            return super().open_stream(argv)

    lines: list[str] = []
    target = StoreChangesUnderfoot(node)

    result = transfer.transfer_image(child, target, status=lines.append)

    assert target.streams == 2
    assert result.mode == "full"
    assert (result.layers_sent, result.layers_total) == (3, 3)
    assert result.fallback.startswith("the target refused the partial archive (")
    assert "layer.tar" in result.fallback
    assert lines[0] == f"{node.name}: {result.fallback}; sending the full image"
    assert lines[-1].endswith(f"(full image: {result.fallback})")
    assert node_engine.image_id(child) == child_id


def test_not_enough_disk_on_the_target_is_refused(shipped, builder, node, node_engine):  # noqa: F811
    tag = f"{REPO}:disk"
    builder.build(tag, {"disk.bin": os.urandom(3_000_000)})

    class SmallDisk(Proxy):
        # df's real output, with the free bytes changed to 1 MB.
        def probe(self, argv):
            done = self.inner.probe(argv)
            if argv[0] == "df":
                header, _value = done.stdout.strip().splitlines()
                assert header.strip() == "Avail"
                return Outcome(True, f"{header}\n1000000\n", "", 0)
            return done

    target = SmallDisk(node)
    with pytest.raises(StateError) as refused:
        transfer.transfer_image(tag, target, status=None)

    root = node_engine.docker("info", "-f", "{{.DockerRootDir}}").stdout.strip()
    assert str(refused.value).startswith(
        f"not enough disk space on {node.name}: loading {tag} needs about "
    )
    assert f"under {root}, 1.0 MB is free" in str(refused.value)
    assert target.streams == 0
    assert node_engine.image_id(tag) is None


def test_engine_down_on_the_target_is_a_clear_error(builder, node_sshd):  # noqa: F811
    with node_sshd.connect() as connection:
        target = transfer.SshTarget(connection, docker_host="unix:///nowhere.sock")
        with pytest.raises(EngineError) as down:
            transfer.transfer_image(builder.root, target, status=None)

    message = str(down.value)
    assert message.startswith(f"the Docker engine on {target.name} does not answer: ")
    assert "unix:///nowhere.sock" in message
    assert message.endswith("start it there (systemctl start docker) and retry")


def test_load_that_stops_reading_is_reported_with_its_words(
    shipped,
    builder,
    node,
    node_engine,  # noqa: F811
):
    tag = f"{REPO}:early"
    builder.build(tag, {"early.bin": os.urandom(6_000_000)})

    class DiskFullsOnLoad(Proxy):
        # docker load that gives up after 1 kB, as on a disk that fills up.
        def open_stream(self, argv):
            self.streams += 1
            fake = (
                "head -c 1000 >/dev/null; echo 'write /x: no space left on device' >&2"
            )
            return self.inner.open_stream(["sh", "-c", f"{fake}; exit 1"])

    target = DiskFullsOnLoad(node)
    with pytest.raises(EngineError) as failed:
        transfer.transfer_image(tag, target, status=None)

    assert str(failed.value) == (
        f"loading {tag} on {node.name} failed: write /x: no space left on device; "
        "check the engine there (docker info, df) and retry"
    )
    # The partial archive first, then the full image: both refused.
    assert target.streams == 2
    assert node_engine.image_id(tag) is None


def test_refused_connection_is_a_clear_error(builder, node_sshd):  # noqa: F811
    closed = free_port()
    endpoint = node_sshd._replace(port=closed)

    with endpoint.connect() as connection, pytest.raises(EngineError) as refused:
        transfer.transfer_image(
            builder.root, transfer.SshTarget(connection), status=None
        )

    message = str(refused.value)
    assert message.startswith(f"cannot reach root@127.0.0.1:{closed} over SSH (")
    assert f"Unable to connect to port {closed} on 127.0.0.1" in message
    assert message.endswith("check the host name, the port and that sshd runs there")


def test_via_files_makes_the_manuals_two_files_and_loads_them(
    builder,
    node,
    node_engine,  # noqa: F811
    tmp_path,
):
    tag = f"{REPO}:via"
    built = builder.build(tag, text("via"))
    docker_dir = tmp_path / "envs" / "vpn" / "docker"
    compose = docker_dir / ".build" / "docker-compose_run_node.yml"
    compose.parent.mkdir(parents=True)
    compose.write_text("services:\n  node:\n    image: fedbiomed/vpn-node\n")
    mounts = docker_dir / "node" / "run_mounts"
    for name, content in {
        "config/config.env": "VPN_IP=10.221.0.2\n",
        "config/wireguard/wg0.conf": "[Interface]\n",
        "data/x.csv": "a,b\n1,2\n",
        "fbm/.gitignore": "*\n",
    }.items():
        (mounts / name).parent.mkdir(parents=True, exist_ok=True)
        (mounts / name).write_text(content)
    out_dir, base_dir, remote_dir = (
        tmp_path / "out",
        tmp_path / "node",
        tmp_path / "copied",
    )
    lines: list[str] = []

    bundle = transfer.ship_via_files(
        tag,
        node,
        out_dir=out_dir,
        base_dir=str(base_dir),
        run_files=transfer.node_run_files(compose, mounts),
        remote_dir=str(remote_dir),
        name="vpn-node",
        status=lines.append,
    )

    assert sorted(p.name for p in out_dir.iterdir()) == [
        "vpn-node-files.tar.gz",
        "vpn-node-image.tar.gz",
    ]
    with tarfile.open(out_dir / "vpn-node-image.tar.gz") as image_tar:
        manifest = json.load(image_tar.extractfile("manifest.json"))
    assert manifest[0]["RepoTags"] == [tag]
    assert manifest[0]["Config"].startswith(built[7:])
    with tarfile.open(out_dir / "vpn-node-files.tar.gz") as files_tar:
        names = set(files_tar.getnames())
    assert "./docker-compose_run_node.yml" in names
    assert "./node/run_mounts/data/x.csv" in names
    assert not {n for n in names if n.endswith(("config.env", "wg0.conf"))}
    assert bundle.excluded == [
        "node/run_mounts/config/config.env",
        "node/run_mounts/config/wireguard/wg0.conf",
    ]
    assert lines[0] == (
        "left out of vpn-node-files.tar.gz (VPN keys and peer settings of this "
        "machine): node/run_mounts/config/config.env, "
        "node/run_mounts/config/wireguard/wg0.conf"
    )
    assert bundle.image_bytes == (out_dir / "vpn-node-image.tar.gz").stat().st_size
    for made in out_dir.iterdir():
        assert made.read_bytes()[:2] == b"\x1f\x8b", f"{made.name} is not gzip"
    assert set(bundle.timings) == {"save", "pack", "copy", "load", "unpack"}

    assert node_engine.image_id(tag) == built
    assert (base_dir / "docker-compose.yml").read_text() == compose.read_text()
    assert not (base_dir / "docker-compose_run_node.yml").exists()
    assert (base_dir / "node/run_mounts/data/x.csv").read_text() == "a,b\n1,2\n"
    assert not (base_dir / "node/run_mounts/config/config.env").exists()
    assert list(remote_dir.iterdir()) == []


def test_df_output_is_parsed():
    real = subprocess.run(
        ["df", "-B1", "--output=avail", "/"], capture_output=True, text=True, check=True
    ).stdout
    assert transfer.parse_df_avail(real) == int(real.split()[-1])
    assert transfer.parse_df_avail("    Avail\n 123456\n") == 123456
    with pytest.raises(EngineError, match="unexpected df output"):
        transfer.parse_df_avail("df: /nowhere: No such file or directory\n")


def test_chain_ids_are_the_engines_own(builder):
    """The chain IDs computed here name the build engine's layer directories."""
    tag = f"{REPO}:chain"
    builder.build(tag, text("chain"))
    diffs = layers_of(tag)
    root = docker("info", "-f", "{{.DockerRootDir}}").stdout.strip()
    layerdb = Path(root) / "image" / "overlay2" / "layerdb" / "sha256"

    chains = transfer.chain_ids(diffs)

    assert chains[0] == diffs[0]
    assert [(layerdb / c[7:] / "diff").read_text() for c in chains] == diffs


def test_names_and_go_json():
    assert transfer.normal_tag("fedbiomed/vpn-node") == "fedbiomed/vpn-node:latest"
    assert (
        transfer.normal_tag("localhost:5000/vpn-node")
        == "localhost:5000/vpn-node:latest"
    )
    assert transfer.normal_tag("fedbiomed/vpn-node:e2e") == "fedbiomed/vpn-node:e2e"
    assert transfer.bundle_name("fedbiomed/vpn-node:e2e") == "vpn-node"
    assert (
        transfer._go_json({"a": "<&>\b\\b"})
        == '{"a":"\\u003c\\u0026\\u003e\\u0008\\\\b"}'
    )
