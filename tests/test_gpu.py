"""GPU prerequisite checks, fed with recorded tool outputs through fake programs.

Each test builds a PATH holding only small shell scripts that replay the files
of tests/data/gpu (stdout, stderr, exit code), then runs the checks through a
real subprocess runner, as `gpu.check` does on a host.
"""

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
from invoke import Config, Context, Exit

from fbmvpn import gpu
from fbmvpn.errors import BadInput, StateError
from fbmvpn.settings import DEFAULTS
from tasks.gpu import check as check_task
from tasks.gpu import ns as gpu_ns

DATA = Path(__file__).parent / "data" / "gpu"
CAT = shutil.which("cat")
SH = shutil.which("sh")

ALL_OK = {
    "nvidia-smi": {"": "nvidia-smi-535.104.05"},
    "docker": {
        "info": "docker-info-runtimes-24-nvidia",
        "compose version": "compose-v2.40.3",
    },
    "nvidia-ctk": {"": None},
}


def _replay(case: str | None) -> str:
    """Shell lines that print a recorded case and exit with its code."""
    if case is None:
        return "exit 0"
    lines = []
    for suffix, redirect in ((".out", ""), (".err", " >&2")):
        path = DATA / f"{case}{suffix}"
        if path.exists():
            lines.append(f"{CAT} {shlex.quote(str(path))}{redirect}")
    rc = DATA / f"{case}.rc"
    assert lines, f"no recorded output for {case}"
    lines.append(f"exit {rc.read_text().strip() if rc.exists() else 0}")
    return "; ".join(lines)


class FakeHost:
    """A directory of fake programs, alone on PATH (plus `sh`)."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.bin.mkdir()
        os.symlink(SH, self.bin / "sh")

    def tool(self, name: str, cases: dict[str, str | None]) -> None:
        """Install `name`; `cases` maps an argument prefix to a recorded case."""
        branches = [
            f"  {shlex.quote(prefix)}*) {_replay(case)} ;;"
            for prefix, case in cases.items()
        ]
        branches.append(f'  *) echo "fake {name}: unexpected: $*" >&2; exit 99 ;;')
        script = self.bin / name
        script.write_text(
            "#!/bin/sh\n" + 'case "$*" in\n' + "\n".join(branches) + "\nesac\n"
        )
        script.chmod(0o755)

    def remove(self, name: str) -> None:
        (self.bin / name).unlink()


@pytest.fixture
def host(tmp_path, monkeypatch):
    fake = FakeHost(tmp_path / "bin")
    for name, cases in ALL_OK.items():
        fake.tool(name, cases)
    monkeypatch.setenv("PATH", str(fake.bin))
    return fake


def by_name(checks):
    return {check.name: check for check in checks}


def run_local(cuda="12.1.1", **kwargs):
    return by_name(gpu.run_checks(gpu.local_runner(), cuda, **kwargs))


# --- whole runs over fake programs -------------------------------------------


def test_all_ok(host):
    checks = run_local()

    assert [c.ok for c in checks.values()] == [True, True, True, True]
    assert checks["nvidia driver"].detail == (
        "driver 535.104.05 >= 525.60.13 (CUDA 12.1.1); "
        "GPU: NVIDIA GeForce RTX 3090, 24576 MiB"
    )
    assert checks["container toolkit"].detail == f"found {host.bin / 'nvidia-ctk'}"
    assert checks["docker nvidia runtime"].detail == (
        "nvidia runtime registered (nvidia-container-runtime)"
    )
    assert checks["docker compose"].detail == "docker compose 2.40.3"
    assert all(c.fix == "" for c in checks.values())


def test_driver_too_old(host):
    host.tool("nvidia-smi", {"": "nvidia-smi-470.182.03"})

    driver = run_local()["nvidia driver"]

    assert not driver.ok
    assert "driver 470.182.03 is older than 525.60.13" in driver.detail
    assert "NVIDIA GeForce GTX 1080 Ti, 11264 MiB" in driver.detail
    assert "upgrade the NVIDIA driver to >= 525.60.13" in driver.fix


def test_driver_exactly_the_minimum(host):
    host.tool("nvidia-smi", {"": "nvidia-smi-525.60.13"})

    driver = run_local()["nvidia driver"]

    assert driver.ok
    assert driver.detail.startswith("driver 525.60.13 >= 525.60.13")


def test_newer_driver_with_two_gpus(host):
    host.tool("nvidia-smi", {"": "nvidia-smi-550.54.15-2gpu"})

    driver = run_local()["nvidia driver"]

    assert driver.ok
    assert driver.detail.count("NVIDIA A100-SXM4-80GB, 81920 MiB") == 2


def test_minimum_follows_the_cuda_version(host):
    assert not run_local("12.4.1")["nvidia driver"].ok

    host.tool("nvidia-smi", {"": "nvidia-smi-550.54.15-2gpu"})
    driver = run_local("12.4.1")["nvidia driver"]

    assert driver.ok
    assert ">= 550.54.14 (CUDA 12.4.1)" in driver.detail


def test_nvidia_smi_missing(host):
    host.remove("nvidia-smi")

    driver = run_local()["nvidia driver"]

    assert not driver.ok
    assert driver.detail.startswith("nvidia-smi not found")
    assert "package manager" in driver.fix
    assert ">= 525.60.13" in driver.fix


def test_nvidia_smi_cannot_reach_the_driver(host):
    host.tool("nvidia-smi", {"": "nvidia-smi-no-driver"})

    driver = run_local()["nvidia driver"]

    assert not driver.ok
    assert driver.detail.startswith(
        "nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it couldn't "
        "communicate with the NVIDIA driver."
    )
    assert "not loaded: reboot" in driver.fix


def test_nvidia_smi_library_mismatch(host):
    host.tool("nvidia-smi", {"": "nvidia-smi-version-mismatch"})

    driver = run_local()["nvidia driver"]

    assert not driver.ok
    assert driver.detail == (
        "nvidia-smi failed (exit 18): "
        "Failed to initialize NVML: Driver/library version mismatch"
    )
    assert "reboot" in driver.fix


def test_toolkit_missing(host):
    host.remove("nvidia-ctk")

    toolkit = run_local()["container toolkit"]

    assert not toolkit.ok
    assert "nvidia-ctk, nvidia-container-toolkit, nvidia-container-runtime" in (
        toolkit.detail
    )
    assert "sudo apt-get install nvidia-container-toolkit" in toolkit.fix
    assert "nvidia-ctk runtime configure --runtime=docker" in toolkit.fix


def test_toolkit_found_through_its_runtime(host):
    host.remove("nvidia-ctk")
    host.tool("nvidia-container-runtime", {"": None})

    toolkit = run_local()["container toolkit"]

    assert toolkit.ok
    assert toolkit.detail.endswith("/nvidia-container-runtime")


def test_runtime_missing_in_docker(host):
    host.tool(
        "docker",
        {"info": "docker-info-runtimes-20.10", "compose version": "compose-v2.40.3"},
    )

    runtime = run_local()["docker nvidia runtime"]

    assert not runtime.ok
    assert runtime.detail == (
        "docker knows no nvidia runtime (runtimes: io.containerd.runc.v2, "
        "io.containerd.runtime.v1.linux, runc)"
    )
    assert runtime.fix == (
        "register the nvidia runtime in docker: `sudo nvidia-ctk runtime "
        "configure --runtime=docker && sudo systemctl restart docker`"
    )


def test_runtime_not_required_with_device_requests(host):
    host.tool(
        "docker",
        {"info": "docker-info-runtimes-20.10", "compose version": "compose-v2.40.3"},
    )

    runtime = run_local(nvidia_runtime=False)["docker nvidia runtime"]

    assert runtime.ok
    assert "not needed with deploy.resources.devices" in runtime.detail


def test_docker_daemon_down(host):
    host.tool(
        "docker",
        {"info": "docker-info-daemon-down", "compose version": "compose-v2.40.3"},
    )

    runtime = run_local()["docker nvidia runtime"]

    assert not runtime.ok
    assert runtime.detail == (
        "docker info failed (exit 1): Cannot connect to the Docker daemon at "
        "unix:///tmp/nonexistent.sock. Is the docker daemon running?"
    )
    assert "systemctl start docker" in runtime.fix


def test_docker_missing(host):
    host.remove("docker")

    checks = run_local()

    assert checks["docker nvidia runtime"].detail == "docker not found"
    assert checks["docker compose"].detail == (
        "`docker compose` is not available (docker not found)"
    )
    assert "docker-compose-plugin" in checks["docker compose"].fix


def test_compose_v1_only(host):
    host.tool(
        "docker",
        {
            "info": "docker-info-runtimes-24-nvidia",
            "compose version": "docker-compose-plugin-missing",
        },
    )
    host.tool("docker-compose", {"--version": "docker-compose-v1.29.2"})

    compose = run_local()["docker compose"]

    assert not compose.ok
    assert compose.detail.startswith(
        "only docker-compose 1.29.2 (Compose v1) is installed"
    )
    assert "sudo apt-get install docker-compose-plugin" in compose.fix


def test_compose_v2_standalone_without_plugin(host):
    host.tool(
        "docker",
        {
            "info": "docker-info-runtimes-24-nvidia",
            "compose version": "docker-compose-plugin-missing",
        },
    )
    host.tool("docker-compose", {"--version": "compose-v2.40.3"})

    compose = run_local()["docker compose"]

    assert not compose.ok
    assert compose.detail == (
        "docker-compose 2.40.3 is installed, but `docker compose` is not "
        "(docker: unknown command: docker compose)"
    )
    assert "~/.docker/cli-plugins/docker-compose" in compose.fix


def test_no_compose_at_all(host):
    host.tool(
        "docker",
        {
            "info": "docker-info-runtimes-24-nvidia",
            "compose version": "docker-compose-plugin-missing",
        },
    )

    compose = run_local()["docker compose"]

    assert not compose.ok
    assert compose.fix == gpu.FIX_COMPOSE


def test_unknown_cuda_version_is_refused(host):
    with pytest.raises(
        BadInput, match="no minimum NVIDIA driver is known for CUDA 9.2"
    ):
        run_local("9.2")


# --- output --------------------------------------------------------------------


def test_json_output_parses(host):
    host.tool("nvidia-smi", {"": "nvidia-smi-470.182.03"})
    host.remove("nvidia-ctk")

    data = json.loads(gpu.to_json(gpu.run_checks(gpu.local_runner())))

    assert data["ok"] is False
    assert [c["name"] for c in data["checks"]] == [
        "nvidia driver",
        "container toolkit",
        "docker nvidia runtime",
        "docker compose",
    ]
    assert [c["ok"] for c in data["checks"]] == [False, False, True, True]
    assert set(data["checks"][0]) == {"name", "ok", "detail", "fix"}


def test_json_output_all_ok(host):
    data = json.loads(gpu.to_json(gpu.run_checks(gpu.local_runner())))

    assert data["ok"] is True


def test_table_lists_results_and_fixes(host):
    host.remove("nvidia-ctk")

    table = gpu.render_table(gpu.run_checks(gpu.local_runner()))
    lines = table.splitlines()

    assert lines[0].split() == ["check", "result", "detail"]
    assert [line[:32].split() for line in lines if line[:1].isalpha()][1:5] == [
        ["nvidia", "driver", "ok"],
        ["container", "toolkit", "FAIL"],
        ["docker", "nvidia", "runtime", "ok"],
        ["docker", "compose", "ok"],
    ]
    assert "To fix:" in lines
    assert lines[-1] == f"- container toolkit: {gpu.FIX_TOOLKIT}"


# --- error translation ---------------------------------------------------------


def recorded(case: str) -> str:
    return (DATA / f"{case}.err").read_text()


def test_translate_compose_v1_rejecting_runtime():
    advice = gpu.translate_error(recorded("faq-compose-v1-runtime"))

    assert advice.startswith(
        "Compose v1 (docker-compose 1.x) rejects `runtime` in service node-gpu-other"
    )
    assert "docker-compose-plugin" in advice


@pytest.mark.parametrize(
    "case",
    [
        "faq-unknown-runtime",
        "engine-20.10-unknown-runtime",
        "compose-v2-unknown-runtime",
        "engine-invalid-runtime-name",
    ],
)
def test_translate_unknown_runtime(case):
    advice = gpu.translate_error(recorded(case))

    assert advice.startswith("Docker does not know the nvidia runtime")
    assert gpu.CONFIGURE_RUNTIME in advice


def test_translate_cuda_requirement_of_the_manual():
    advice = gpu.translate_error(recorded("faq-cuda-requirement"))

    assert advice.startswith(
        "The host's NVIDIA driver is too old for the CUDA 11.6 of the container"
    )
    assert "a release >= 510.39.01" in advice


def test_translate_cuda_requirement_beyond_the_table():
    advice = gpu.translate_error(recorded("compose-v2-cuda-requirement"))

    assert "too old for the CUDA 12.8 of the container" in advice
    assert "a release >= 570.26" in advice


@pytest.mark.parametrize(
    "case", ["engine-20.10-gpus-no-driver", "compose-v2-no-device-driver"]
)
def test_translate_no_device_driver(case):
    advice = gpu.translate_error(recorded(case))

    assert advice.startswith("Docker found no GPU device driver")
    assert "nvidia-container-toolkit" in advice


@pytest.mark.parametrize(
    "case", ["docker-info-daemon-down", "docker-compose-plugin-missing"]
)
def test_unrelated_errors_are_not_translated(case):
    assert gpu.translate_error(recorded(case)) is None


# --- parsers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "minimum", "expected"),
    [
        ("525.60.13", "525.60.13", True),
        ("525.60.12", "525.60.13", False),
        ("525.60.9", "525.60.13", False),
        ("570.26", "570.26.1", False),
        ("525.105.17", "525.60.13", True),
        ("530.30.02", "525.60.13", True),
        ("470.182.03", "525.60.13", False),
        ("570.26", "570.26.0", True),
        ("2.0", "2.0", True),
        ("1.29.2", "2.0", False),
    ],
)
def test_versions_compare_numerically(version, minimum, expected):
    assert gpu.version_at_least(version, minimum) is expected


@pytest.mark.parametrize(
    ("cuda", "driver"),
    [
        ("12.1.1", "525.60.13"),
        ("12.1", "525.60.13"),
        ("11.8.0", "520.61.05"),
        ("12.0", "525.60.13"),
        ("12.2.2", "535.54.03"),
        ("12.4", "550.54.14"),
    ],
)
def test_min_driver(cuda, driver):
    assert gpu.min_driver(cuda) == driver


@pytest.mark.parametrize("cuda", ["12", "14.0", "twelve"])
def test_min_driver_refuses_unknown_versions(cuda):
    with pytest.raises(BadInput):
        gpu.min_driver(cuda)


def test_parse_nvidia_smi():
    gpus = gpu.parse_nvidia_smi((DATA / "nvidia-smi-525.60.13.out").read_text())

    assert gpus == [gpu.Gpu("525.60.13", "Tesla T4", 15360)]


def test_parse_nvidia_smi_refuses_an_error_text():
    with pytest.raises(StateError, match="instead of 'driver, name, memory'"):
        gpu.parse_nvidia_smi((DATA / "nvidia-smi-no-driver.out").read_text())


@pytest.mark.parametrize(
    ("case", "version"),
    [
        ("compose-v2.40.3.out", "2.40.3"),
        ("compose-v2.40.3-short.out", "2.40.3"),
        ("docker-compose-v1.29.2.out", "1.29.2"),
    ],
)
def test_parse_compose_version(case, version):
    assert gpu.parse_compose_version((DATA / case).read_text()) == version


def test_parse_compose_version_refuses_an_error_text():
    with pytest.raises(StateError):
        gpu.parse_compose_version(recorded("docker-compose-plugin-missing"))


def test_parse_runtimes_of_full_docker_info():
    runtimes = gpu.parse_runtimes((DATA / "docker-info-full-20.10.out").read_text())

    assert sorted(runtimes) == [
        "io.containerd.runc.v2",
        "io.containerd.runtime.v1.linux",
        "runc",
    ]
    assert not gpu.has_nvidia_runtime(runtimes)


def test_parse_runtimes_with_nvidia():
    runtimes = gpu.parse_runtimes(
        (DATA / "docker-info-runtimes-24-nvidia.out").read_text()
    )

    assert runtimes["nvidia"] == {"path": "nvidia-container-runtime"}


def test_parse_runtimes_of_an_unreachable_daemon():
    with pytest.raises(StateError, match="listed no runtimes"):
        gpu.parse_runtimes((DATA / "docker-info-daemon-down.out").read_text())


def test_find_toolkit_takes_the_first_program_found():
    paths = {"nvidia-container-runtime": "/usr/bin/nvidia-container-runtime"}

    assert gpu.find_toolkit(paths.get) == "/usr/bin/nvidia-container-runtime"
    assert gpu.find_toolkit({}.get) is None


def test_local_runner_reports_a_missing_program(host):
    code, out, err = gpu.local_runner()(["no-such-program", "--version"])

    assert (code, out) == (127, "")
    assert err == "no-such-program: command not found\n"


# --- the Invoke task -----------------------------------------------------------


def task_context(**gpu_config):
    overrides = {"run": {"in_stream": False}}
    if gpu_config:
        overrides["fbm"] = {"gpu": gpu_config}
    return Context(config=Config(overrides=overrides))


def test_task_prints_json_and_passes(host, capsys):
    check_task(task_context(), json=True)

    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True


def test_task_fails_with_the_names_of_failed_checks(host, capsys):
    host.remove("nvidia-ctk")

    with pytest.raises(Exit) as raised:
        check_task(task_context())

    assert raised.value.code == 1
    assert str(raised.value.message) == (
        "GPU prerequisites not met: container toolkit; see the fixes above"
    )
    out = capsys.readouterr().out
    assert re.search(r"^container toolkit +FAIL +none of nvidia-ctk", out, re.M)


def test_task_takes_the_cuda_version_from_config(host, capsys):
    with pytest.raises(Exit):
        check_task(task_context(cuda_version="12.4.1"), json=True)

    data = json.loads(capsys.readouterr().out)
    assert "older than 550.54.14" in data["checks"][0]["detail"]


def test_task_refuses_an_unknown_cuda_version(host):
    with pytest.raises(Exit, match="no minimum NVIDIA driver is known for CUDA 9.2"):
        check_task(task_context(), cuda="9.2")


def test_settings_read_the_cuda_version_from_the_image_by_default():
    assert DEFAULTS["gpu"]["cuda_version"] == "auto"
    assert gpu.DEFAULT_CUDA == "12.1.1"


def test_auto_takes_the_cuda_release_of_the_node_image(host, capsys):
    (host.bin / "torch-cuda").write_text("13.0\n")
    host.tool(
        "docker",
        {**ALL_OK["docker"], "run --rm --entrypoint cat fedbiomed/vpn-node:": None},
    )
    # the fake `docker run` prints the file the image would hold
    script = (host.bin / "docker").read_text()
    script = script.replace(
        "run --rm --entrypoint cat fedbiomed/vpn-node:'*) exit 0",
        f"run --rm --entrypoint cat fedbiomed/vpn-node:'*) {CAT} {host.bin}/torch-cuda",
    )
    (host.bin / "docker").write_text(script)

    with pytest.raises(Exit):
        check_task(task_context(), json=True)

    detail = json.loads(capsys.readouterr().out)["checks"][0]["detail"]
    assert "older than 580.65.06" in detail and "CUDA 13.0" in detail


def test_auto_without_the_image_falls_back_to_the_manual_release(host, capsys):
    check_task(task_context(), json=True)

    detail = json.loads(capsys.readouterr().out)["checks"][0]["detail"]
    assert "CUDA 12.1.1" in detail


def test_a_cpu_torch_image_is_refused_for_gpu(host):
    host.tool(
        "docker",
        {**ALL_OK["docker"], "run --rm --entrypoint cat fedbiomed/vpn-node:": None},
    )
    script = (
        (host.bin / "docker")
        .read_text()
        .replace("fedbiomed/vpn-node:'*) exit 0", "fedbiomed/vpn-node:'*) echo cpu")
    )
    (host.bin / "docker").write_text(script)

    with pytest.raises(Exit, match="CPU build of torch"):
        check_task(task_context())
    assert sorted(gpu_ns.task_names) == ["check"]
