"""Which images a build makes, from what, and the offline (wheelhouse) build."""

import copy

import pytest
from invoke import Config, Context

from fbmvpn import stack as stack_module
from fbmvpn.errors import BadInput
from fbmvpn.host import LocalHost
from fbmvpn.settings import DEFAULTS, PROJECT_ROOT, Settings
from fbmvpn.stack import Stack, image_order


def make_stack(tmp_path, **build):
    raw = copy.deepcopy(DEFAULTS)
    raw["compose_dir"] = str(tmp_path / "compose")
    raw["build"].update(base_image="fbm-local/debian:bookworm", **build)
    ctx = Context(Config(overrides={"run": {"echo": False}}))
    said: list[str] = []
    return Stack(LocalHost(ctx), Settings.from_config(raw), say=said.append), said


def test_components_start_from_the_fedbiomed_layer():
    assert image_order(["node", "researcher", "gui"]) == [
        "fbm",
        "basefbm",
        "node",
        "researcher",
        "gui",
    ]


def test_vpn_only_images_skip_fedbiomed():
    assert image_order(["vpnserver", "node"], fedbiomed=False) == [
        "base",
        "vpnserver",
        "node",
    ]


def test_unknown_image_is_refused():
    with pytest.raises(BadInput, match="unknown image 'basenode'"):
        image_order(["basenode"])


@pytest.mark.parametrize(
    "change",
    [
        {"fedbiomed": False},
        {"torch_index": "https://example.org/whl/cpu"},
    ],
)
def test_what_the_images_hold_changes_their_source_hash(tmp_path, change):
    plain, _ = make_stack(tmp_path)
    changed, _ = make_stack(tmp_path, **change)
    assert plain.source_hash() != changed.source_hash()


def test_another_fedbiomed_version_means_a_rebuild(tmp_path):
    plain, _ = make_stack(tmp_path)
    other, _ = make_stack(tmp_path)
    other.settings.raw["fedbiomed_version"] = "6.3.0"
    assert plain.source_hash() != other.source_hash()
    assert other.compose_env()["FEDBIOMED_VERSION"] == "6.3.0"


def test_vpn_only_components_build_from_base(tmp_path):
    stack, _ = make_stack(tmp_path, fedbiomed=False)
    assert stack.compose_env()["FBM_FROM"] == "base"


def test_wheelhouse_staged_for_the_fbm_build(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "fedbiomed-6.4.1-py3-none-any.whl").write_bytes(b"wheel")
    (wheels / "notes.txt").write_text("not a wheel")
    stack, said = make_stack(tmp_path)
    staged = tmp_path / "compose" / ".build" / "wheelhouse"
    staged.mkdir(parents=True)
    (staged / "stale-1.0-py3-none-any.whl").write_bytes(b"old")

    stack._stage_wheelhouse(str(wheels))

    assert sorted(p.name for p in staged.iterdir()) == [
        "fedbiomed-6.4.1-py3-none-any.whl"
    ]
    assert "staging 1 wheels" in said[-1]


def test_no_wheelhouse_leaves_the_build_folder_empty(tmp_path):
    stack, _ = make_stack(tmp_path)
    staged = tmp_path / "compose" / ".build" / "wheelhouse"
    staged.mkdir(parents=True)
    (staged / "stale-1.0-py3-none-any.whl").write_bytes(b"old")

    stack._stage_wheelhouse(None)

    assert list(staged.iterdir()) == []


@pytest.mark.parametrize(
    "kind, message",
    [("empty", "holds no .whl file.*pip download -d"), ("missing", "not a readable")],
)
def test_wheelhouse_without_wheels_is_refused(tmp_path, kind, message):
    wheels = tmp_path / "wheels"
    if kind == "empty":
        wheels.mkdir()
    stack, _ = make_stack(tmp_path)
    with pytest.raises(BadInput, match=message):
        stack._stage_wheelhouse(str(wheels))


def test_a_code_change_does_not_reinstall_fedbiomed(tmp_path, monkeypatch):
    stack, _ = make_stack(tmp_path)
    layer, code = stack.image_hash("fbm"), stack.image_hash("node")
    changed_root = tmp_path / "root"
    (changed_root / "fbmvpn").mkdir(parents=True)
    (changed_root / "fbmvpn" / "stack.py").write_text("changed = True\n")
    dockerfile = "envs/vpn/docker/fbm/Dockerfile"
    (changed_root / dockerfile).parent.mkdir(parents=True)
    (changed_root / dockerfile).write_bytes((PROJECT_ROOT / dockerfile).read_bytes())
    monkeypatch.setattr(stack_module, "PROJECT_ROOT", changed_root)
    stack_module.source_hash.cache_clear()
    try:
        assert stack.image_hash("node") != code
        assert stack.image_hash("fbm") == layer
    finally:
        stack_module.source_hash.cache_clear()


@pytest.mark.parametrize(
    "name, kept",
    [("node", "data"), ("researcher", "samples"), ("gui", "certs")],
)
def test_clean_config_keeps_user_files_unless_asked(tmp_path, name, kept):
    stack, _ = make_stack(tmp_path)
    mounts = stack.run_mounts(name)

    plain = stack.clean_targets(name, "config")
    everything = stack.clean_targets(name, "config", datasets=True)

    assert mounts / kept not in plain
    assert mounts / kept in everything
    assert stack.clean_targets(name, "container", datasets=True) == []
