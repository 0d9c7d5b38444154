"""Host prerequisites of a GPU node, and advice for docker's GPU errors.

A node container uses the host's NVIDIA GPU when the host has a driver recent
enough for the CUDA version of the node image, the NVIDIA Container Toolkit,
docker's `nvidia` runtime and Docker Compose >= 2.0. `run_checks` probes all
of them through an injected `run(argv) -> (exit_code, stdout, stderr)`, so the
same checks run on this machine (`local_runner`) or through an Invoke context
or a Fabric connection (`shell_runner`). A missing command must give exit code
127, as shells do.

`translate_error` recognises the errors docker and compose print when one of
these prerequisites is missing and returns the fix.
"""

import json
import logging
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .errors import BadInput, StateError

log = logging.getLogger(__name__)

Runner = Callable[[list[str]], tuple[int, str, str]]
Which = Callable[[str], str | None]

DEFAULT_CUDA = "12.1.1"

# Minimum Linux x86_64 driver of each CUDA minor release (the toolkit's GA
# release notes). For 12.1 the deployment manual's figure is kept: 525.60.13,
# the CUDA 12 floor of minor version compatibility, where the toolkit itself
# lists 530.30.02.
MIN_DRIVER = {
    "11.6": "510.39.01",
    "11.7": "515.43.04",
    "11.8": "520.61.05",
    "12.0": "525.60.13",
    "12.1": "525.60.13",
    "12.2": "535.54.03",
    "12.3": "545.23.06",
    "12.4": "550.54.14",
    "12.5": "555.42.02",
    "12.6": "560.28.03",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
    # PyPI's torch 2.15 is built for 13.2; like the manual's 12.1, the CUDA 13
    # floor of minor version compatibility
    "13.1": "580.65.06",
    "13.2": "580.65.06",
}

# Written at build time in the Fed-BioMed layer: the CUDA release its torch
# was built for (`cpu` for a CPU build).
TORCH_CUDA_FILE = "/opt/fbm-venv/torch-cuda"

RECOMMENDED_GPU_MIB = 4096
TOOLKIT_BINARIES = (
    "nvidia-ctk",
    "nvidia-container-toolkit",
    "nvidia-container-runtime",
)
NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=driver_version,name,memory.total",
    "--format=csv,noheader",
]
DOCKER_RUNTIMES = ["docker", "info", "--format", "{{json .Runtimes}}"]
COMPOSE_PLUGIN_VERSION = ["docker", "compose", "version"]
COMPOSE_V1_VERSION = ["docker-compose", "--version"]

CONFIGURE_RUNTIME = (
    "sudo nvidia-ctk runtime configure --runtime=docker && "
    "sudo systemctl restart docker"
)
FIX_TOOLKIT = (
    "install the NVIDIA Container Toolkit from NVIDIA's repository "
    "(https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/"
    "install-guide.html): `sudo apt-get install nvidia-container-toolkit` "
    "(Debian, Ubuntu) or `sudo dnf install nvidia-container-toolkit` "
    f"(Fedora, RHEL); then `{CONFIGURE_RUNTIME}`"
)
FIX_RUNTIME = f"register the nvidia runtime in docker: `{CONFIGURE_RUNTIME}`"
FIX_DOCKER = (
    "install Docker Engine (`docker-ce` from Docker's repository or the "
    "distribution's `docker.io`)"
)
FIX_DAEMON = (
    "start the daemon (`sudo systemctl start docker`) and make sure this user "
    "may reach it (member of the `docker` group); `docker info` must work"
)
FIX_COMPOSE = (
    "install Compose v2 as a docker CLI plugin: `sudo apt-get install "
    "docker-compose-plugin` (Debian, Ubuntu, from Docker's repository) or "
    "`sudo dnf install docker-compose-plugin` (Fedora, RHEL); "
    "`docker compose version` must then print 2.x"
)
FIX_COMPOSE_LINK = (
    "make it the docker CLI plugin: `mkdir -p ~/.docker/cli-plugins && "
    'ln -s "$(command -v docker-compose)" ~/.docker/cli-plugins/docker-compose`'
)

_VERSION = re.compile(r"v?(\d+(?:\.\d+)*)")
_COMPOSE_VERSION = re.compile(r"^\s*(?:.*?\bversion\s+)?v?(\d+(?:\.\d+)+)", re.I | re.M)


@dataclass(frozen=True)
class Check:
    """The outcome of one prerequisite check; `fix` is empty when it passed."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Gpu:
    """One line of nvidia-smi's CSV query: a GPU and the driver it runs on."""

    driver: str
    name: str
    memory_mib: int | None

    def describe(self) -> str:
        if self.memory_mib is None:
            return self.name
        return f"{self.name}, {self.memory_mib} MiB"


def version_tuple(text: str) -> tuple[int, ...]:
    """Turn `535.104.05` or `v2.40.3` into a tuple of integers."""
    match = _VERSION.fullmatch(text.strip())
    if not match:
        raise BadInput(
            f"{text.strip()!r} is not a version number; "
            "expected numbers separated by dots, such as 535.104.05"
        )
    return tuple(int(part) for part in match.group(1).split("."))


def version_at_least(version: str, minimum: str) -> bool:
    """Compare two dotted versions numerically (`535.54` >= `525.60.13`)."""
    have, need = version_tuple(version), version_tuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def resolve_cuda(run: Runner, setting: str, image: str) -> str:
    """The CUDA release to check the driver against: `setting`, or with `auto`
    the one the node image's torch was built for, else DEFAULT_CUDA (image
    not built here)."""
    if setting and setting != "auto":
        return setting
    argv = ["docker", "run", "--rm", "--entrypoint", "cat", image, TORCH_CUDA_FILE]
    code, out, _ = run(argv)
    found = out.strip() if code == 0 else ""
    if found == "cpu":
        raise BadInput(
            f"{image} holds a CPU build of torch (fbm.build.torch_index is set), "
            f"which cannot use a GPU; empty fbm.build.torch_index and rebuild: "
            f"`invoke build --images node --force`"
        )
    if re.fullmatch(r"\d+\.\d+(\.\d+)?", found):
        return found
    log.debug("no CUDA release read from %s (%s); using %s", image, out, DEFAULT_CUDA)
    return DEFAULT_CUDA


def min_driver(cuda_version: str) -> str:
    """The oldest NVIDIA driver that runs containers of this CUDA version."""
    parts = version_tuple(cuda_version)
    key = ".".join(str(part) for part in parts[:2])
    if len(parts) < 2 or key not in MIN_DRIVER:
        raise BadInput(
            f"no minimum NVIDIA driver is known for CUDA {cuda_version}; "
            f"use one of {', '.join(MIN_DRIVER)} (--cuda, or gpu.cuda_version "
            "in invoke.yaml)"
        )
    return MIN_DRIVER[key]


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Parse `nvidia-smi --query-gpu=driver_version,name,memory.total
    --format=csv,noheader`: one `driver, name, memory` line per GPU."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) < 3 or not re.fullmatch(r"\d+(?:\.\d+)+", fields[0]):
            raise StateError(
                f"nvidia-smi printed {line.strip()[:80]!r} instead of "
                "'driver, name, memory'; run `nvidia-smi` to see what is wrong"
            )
        memory = re.fullmatch(r"(\d+)\s*MiB", fields[-1])
        gpus.append(
            Gpu(
                driver=fields[0],
                name=", ".join(fields[1:-1]),
                memory_mib=int(memory.group(1)) if memory else None,
            )
        )
    if not gpus:
        raise StateError(
            "nvidia-smi listed no GPU; check that the system sees one "
            "(`lspci | grep -i nvidia`)"
        )
    return gpus


def parse_runtimes(text: str) -> dict[str, dict]:
    """Parse `docker info --format '{{json .Runtimes}}'`, or the whole
    `docker info --format '{{json .}}'`, into {runtime name: settings}."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise StateError(
            f"docker info printed {text.strip()[:80]!r}, not JSON ({error.msg}); "
            "run `docker info` to see what is wrong"
        ) from error

    if isinstance(data, dict) and ("ServerErrors" in data or "Runtimes" in data):
        if data.get("ServerErrors"):
            raise StateError(f"docker info: {data['ServerErrors'][0]}")
        data = data.get("Runtimes")

    if not isinstance(data, dict):
        raise StateError(
            "docker info listed no runtimes; the daemon is probably not "
            "reachable (`docker info` must work)"
        )
    return data


def has_nvidia_runtime(runtimes: dict[str, dict]) -> bool:
    return "nvidia" in runtimes


def find_toolkit(which: Which) -> str | None:
    """Path of the first NVIDIA Container Toolkit program found, or None."""
    for binary in TOOLKIT_BINARIES:
        path = which(binary)
        if path:
            return path
    return None


def parse_compose_version(text: str) -> str:
    """The version in `docker compose version [--short]` or
    `docker-compose --version` output (`2.40.3`, `1.29.2`)."""
    match = _COMPOSE_VERSION.search(text)
    if not match:
        raise StateError(f"no Compose version found in {text.strip()[:80]!r}")
    return match.group(1)


def local_runner(timeout: float = 60) -> Runner:
    """A runner for this machine: no shell, 127 when the program is missing."""

    def run(argv: list[str]) -> tuple[int, str, str]:
        log.debug("running %s", shlex.join(argv))
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            return 127, "", f"{argv[0]}: command not found\n"
        except PermissionError as error:
            return 126, "", f"{argv[0]}: {error.strerror}\n"
        except subprocess.TimeoutExpired:
            return 124, "", f"{argv[0]} did not answer within {timeout:g} s\n"
        log.debug("%s exited %d", argv[0], done.returncode)
        return done.returncode, done.stdout, done.stderr

    return run


def shell_runner(context) -> Runner:
    """A runner over anything with Invoke's `run(command, hide=, warn=)`: an
    Invoke Context, a Fabric Connection. The probes change nothing, so they
    run even under `--dry`."""

    def run(argv: list[str]) -> tuple[int, str, str]:
        result = context.run(
            shlex.join(argv), hide=True, warn=True, in_stream=False, dry=False
        )
        return result.exited, result.stdout, result.stderr

    return run


def runner_which(run: Runner) -> Which:
    """A `which` that looks programs up on the runner's side."""

    def which(name: str) -> str | None:
        code, out, _ = run(["sh", "-c", 'command -v "$1"', "sh", name])
        path = out.strip()
        return path if code == 0 and path else None

    return which


def _first_line(*texts: str) -> str:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                return line.strip()
    return ""


def _driver_install_fix(minimum: str) -> str:
    return (
        f"install an NVIDIA driver >= {minimum} with the distribution's package "
        "manager (Ubuntu: `sudo ubuntu-drivers install`; Debian: `sudo apt-get "
        "install nvidia-driver` from non-free; Fedora: `sudo dnf install "
        "akmod-nvidia` from RPM Fusion), then reboot"
    )


def _smi_failure_fix(output: str, minimum: str) -> str:
    if "version mismatch" in output:
        return (
            "the driver's kernel module and libraries differ, usually after an "
            "upgrade: reboot (or reload the nvidia kernel modules)"
        )
    if "couldn't communicate" in output or "No devices were found" in output:
        return (
            "the driver is installed but not loaded: reboot; if it persists, "
            "check `lsmod | grep nvidia` and `dmesg | grep -i nvrm` (Secure "
            "Boot may refuse the module; after a kernel update DKMS must rebuild "
            f"it). A driver >= {minimum} is needed"
        )
    return f"run `nvidia-smi` to see the error; a driver >= {minimum} is needed"


def check_driver(run: Runner, cuda_version: str = DEFAULT_CUDA) -> Check:
    """Is the NVIDIA driver loaded and recent enough for this CUDA version?"""
    name = "nvidia driver"
    minimum = min_driver(cuda_version)

    code, out, err = run(NVIDIA_SMI_QUERY)
    if code == 127:
        return Check(
            name,
            False,
            f"nvidia-smi not found: no NVIDIA driver installed "
            f"(CUDA {cuda_version} needs >= {minimum})",
            _driver_install_fix(minimum),
        )
    if code != 0:
        message = _first_line(out, err) or "no message"
        return Check(
            name,
            False,
            f"nvidia-smi failed (exit {code}): {message}",
            _smi_failure_fix(out + err, minimum),
        )

    try:
        gpus = parse_nvidia_smi(out)
    except StateError as error:
        return Check(name, False, str(error), _driver_install_fix(minimum))

    driver = min((gpu.driver for gpu in gpus), key=version_tuple)
    listing = "; ".join(gpu.describe() for gpu in gpus)
    if not version_at_least(driver, minimum):
        return Check(
            name,
            False,
            f"driver {driver} is older than {minimum}, the minimum for CUDA "
            f"{cuda_version}; GPU: {listing}",
            f"upgrade the NVIDIA driver to >= {minimum} with the distribution's "
            "package manager (`apt`, `dnf`), then reboot",
        )

    detail = f"driver {driver} >= {minimum} (CUDA {cuda_version}); GPU: {listing}"
    if any(
        gpu.memory_mib is not None and gpu.memory_mib < RECOMMENDED_GPU_MIB
        for gpu in gpus
    ):
        detail += "; less GPU memory than the 4 GiB recommended"
    return Check(name, True, detail)


def check_toolkit(which: Which) -> Check:
    """Is the NVIDIA Container Toolkit installed?"""
    name = "container toolkit"
    path = find_toolkit(which)
    if path is None:
        return Check(
            name,
            False,
            f"none of {', '.join(TOOLKIT_BINARIES)} is on PATH",
            FIX_TOOLKIT,
        )
    return Check(name, True, f"found {path}")


def check_runtime(run: Runner, required: bool = True) -> Check:
    """Does docker know the `nvidia` runtime? With `required=False` (compose
    `deploy.resources.devices` instead of `runtime: nvidia`) its absence is
    reported but passes."""
    name = "docker nvidia runtime"

    code, out, err = run(DOCKER_RUNTIMES)
    if code == 127:
        return Check(name, False, "docker not found", FIX_DOCKER)
    if code != 0:
        message = _first_line(err, out) or "no message"
        return Check(
            name, False, f"docker info failed (exit {code}): {message}", FIX_DAEMON
        )

    try:
        runtimes = parse_runtimes(out)
    except StateError as error:
        return Check(name, False, str(error), FIX_DAEMON)

    if has_nvidia_runtime(runtimes):
        path = runtimes["nvidia"].get("path", "?")
        return Check(name, True, f"nvidia runtime registered ({path})")
    known = ", ".join(sorted(runtimes)) or "none"
    if not required:
        return Check(
            name,
            True,
            f"no nvidia runtime (runtimes: {known}); "
            "not needed with deploy.resources.devices",
        )
    return Check(
        name, False, f"docker knows no nvidia runtime (runtimes: {known})", FIX_RUNTIME
    )


def check_compose(run: Runner) -> Check:
    """Is `docker compose` available in version 2.0 or later?"""
    name = "docker compose"

    code, out, err = run(COMPOSE_PLUGIN_VERSION)
    if code == 0:
        try:
            version = parse_compose_version(out)
        except StateError as error:
            return Check(name, False, str(error), FIX_COMPOSE)
        if version_at_least(version, "2.0"):
            return Check(name, True, f"docker compose {version}")
        return Check(
            name, False, f"docker compose {version} is older than 2.0", FIX_COMPOSE
        )
    plugin_error = "docker not found" if code == 127 else _first_line(err, out)

    v1_code, v1_out, _ = run(COMPOSE_V1_VERSION)
    if v1_code == 0:
        try:
            version = parse_compose_version(v1_out)
        except StateError:
            version = None
        if version and version_tuple(version)[0] < 2:
            return Check(
                name,
                False,
                f"only docker-compose {version} (Compose v1) is installed; "
                "it rejects `runtime` in the GPU services",
                FIX_COMPOSE,
            )
        if version:
            return Check(
                name,
                False,
                f"docker-compose {version} is installed, but `docker compose` "
                f"is not ({plugin_error})",
                FIX_COMPOSE_LINK,
            )
    return Check(
        name, False, f"`docker compose` is not available ({plugin_error})", FIX_COMPOSE
    )


def run_checks(
    run: Runner,
    cuda_version: str = DEFAULT_CUDA,
    *,
    which: Which | None = None,
    nvidia_runtime: bool = True,
) -> list[Check]:
    """Check every GPU prerequisite through `run`; raises BadInput only for a
    CUDA version whose minimum driver is unknown."""
    min_driver(cuda_version)
    which = which or runner_which(run)
    return [
        check_driver(run, cuda_version),
        check_toolkit(which),
        check_runtime(run, required=nvidia_runtime),
        check_compose(run),
    ]


def failed(checks: list[Check]) -> list[Check]:
    return [check for check in checks if not check.ok]


def render_table(checks: list[Check]) -> str:
    """A pass/fail table, then one line per fix so commands copy whole."""
    rows = [(c.name, "ok" if c.ok else "FAIL", c.detail) for c in checks]
    from tabulate import tabulate  # here: importing it slows every task start

    text = tabulate(
        rows,
        headers=("check", "result", "detail"),
        tablefmt="simple",
        maxcolwidths=[None, None, 64],
    )
    fixes = [f"- {c.name}: {c.fix}" for c in failed(checks)]
    if fixes:
        text += "\n\nTo fix:\n" + "\n".join(fixes)
    return text


def to_json(checks: list[Check]) -> str:
    return json.dumps(
        {"ok": not failed(checks), "checks": [asdict(c) for c in checks]}, indent=2
    )


def _advice_compose_v1(match: re.Match) -> str:
    return (
        f"Compose v1 (docker-compose 1.x) rejects `runtime` in service "
        f"{match.group(1)}: the GPU services need Docker Compose >= 2.0. "
        f"{FIX_COMPOSE[0].upper()}{FIX_COMPOSE[1:]}, and run `docker compose` "
        "(two words)."
    )


def _advice_unknown_runtime(match: re.Match) -> str:
    return (
        "Docker does not know the nvidia runtime: install the NVIDIA driver and "
        "the NVIDIA Container Toolkit (nvidia-container-toolkit), then register "
        f"the runtime: `{CONFIGURE_RUNTIME}`. `invoke gpu.check` shows what is "
        "missing."
    )


def _advice_cuda(match: re.Match) -> str:
    cuda = match.group(1)
    try:
        need = f">= {min_driver(cuda)}"
    except BadInput:
        need = f"that supports CUDA {cuda}"
    return (
        f"The host's NVIDIA driver is too old for the CUDA {cuda} of the "
        f"container: upgrade the driver to a release {need} with the "
        "distribution's package manager and reboot, or use an image built for "
        f"an older CUDA. `invoke gpu.check --cuda {cuda}` compares the "
        "installed driver."
    )


def _advice_device_driver(match: re.Match) -> str:
    return (
        "Docker found no GPU device driver for the container: install the "
        "NVIDIA Container Toolkit (nvidia-container-toolkit, which provides the "
        "hook docker runs for GPU requests) and restart docker "
        "(`sudo systemctl restart docker`). `invoke gpu.check` shows what is "
        "missing."
    )


_TRANSLATIONS = (
    (
        re.compile(r"Unsupported config option for services\.([^:\s]+): 'runtime'"),
        _advice_compose_v1,
    ),
    (
        re.compile(
            r"Unknown runtime specified nvidia|unknown or invalid runtime name: nvidia",
            re.I,
        ),
        _advice_unknown_runtime,
    ),
    (
        re.compile(r"unsatisfied condition: cuda\s*>=\s*(\d+(?:\.\d+)*)"),
        _advice_cuda,
    ),
    (
        re.compile(r'could not select device driver "(?:nvidia)?" with capabilities'),
        _advice_device_driver,
    ),
)


def translate_error(text: str) -> str | None:
    """The advice for a GPU error in docker or compose output, else None."""
    for pattern, advice in _TRANSLATIONS:
        match = pattern.search(text)
        if match:
            return advice(match)
    return None
