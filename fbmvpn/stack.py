"""The deployment logic: images, the VPN server, peers, components, status.

A `Stack` is one instance of the compose project on one host. Every step is
idempotent: it looks first, and changes only what differs from the goal.
"""

import hashlib
import ipaddress
import json
import re
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from . import envfile, registry, templates
from .errors import BadInput, EngineError, StateError
from .settings import PROJECT_ROOT, Settings


@dataclass(frozen=True)
class Component:
    name: str
    peer_type: str | None = None  # None: not a VPN peer
    mounts: tuple[str, ...] = ("config",)
    image: str = ""
    gpu_service: str | None = None

    @property
    def is_peer(self) -> bool:
        return self.peer_type is not None

    @property
    def services(self) -> list[str]:
        """Every compose service that runs this component's container."""
        return [self.name] + ([self.gpu_service] if self.gpu_service else [])


COMPONENTS = {
    "vpnserver": Component("vpnserver", None, ("config",), "vpnserver"),
    "node": Component("node", "node", ("config", "data", "fbm"), "node", "node-gpu"),
    "node2": Component("node2", "node", ("config", "data", "fbm"), "node", "node2-gpu"),
    "researcher": Component(
        "researcher", "researcher", ("config", "data", "fbm", "samples"), "researcher"
    ),
    "gui": Component("gui", None, ("certs",), "gui"),
}

# image -> (compose service that builds it, image it is built FROM). node,
# researcher and gui start from basefbm (the base on the Fed-BioMed layer), or
# from base when fbm.build.fedbiomed is false (VPN only); see `image_order`.
IMAGES = {
    "base": ("base", None),
    "fbm": ("fbm", None),
    "basefbm": ("basefbm", "fbm"),
    "vpnserver": ("vpnserver", "base"),
    "node": ("node", "basefbm"),
    "researcher": ("researcher", "basefbm"),
    "gui": ("gui", "basefbm"),
}
OFFICIAL_BASE = "debian:bookworm-slim"
LOCAL_BASE = "fbm-local/debian:bookworm"  # made by `invoke build.base-os`
RESEARCHER_IP = "10.222.0.2"


def component(name: str) -> Component:
    try:
        return COMPONENTS[name]
    except KeyError:
        raise BadInput(
            f"unknown component {name!r}; use one of: {', '.join(COMPONENTS)}"
        ) from None


def image_order(names, fedbiomed: bool = True) -> list[str]:
    """The images to build for `names`, each after the image it starts FROM."""
    order: list[str] = []

    def visit(name):
        if name not in IMAGES:
            raise BadInput(f"unknown image {name!r}; use one of: {', '.join(IMAGES)}")
        parent = IMAGES[name][1]
        if parent == "basefbm" and not fedbiomed:
            parent = "base"
        if parent:
            visit(parent)
        if name not in order:
            order.append(name)

    for name in names:
        visit(name)
    return order


class Stack:
    """One compose instance on one host."""

    def __init__(self, host, settings: Settings, say=print):
        self.host = host
        self.settings = settings
        self.say = say
        self.project = f"fbm-vpn-{settings.instance}"
        self.compose_file = settings.compose_dir / "docker-compose.yml"
        self.env_file = settings.mounts / f"compose-{settings.instance}.env"
        self._variants: dict[str, str] = {}  # component -> container name
        self._base: str | None = None

    # -- paths and commands --------------------------------------------------

    def run_mounts(self, name: str) -> Path:
        return self.settings.mounts / name / "run_mounts"

    def image(self, name: str) -> str:
        return f"fedbiomed/vpn-{name}:{self.settings.tag}"

    def container(self, name: str) -> str:
        """The container of a component: its GPU variant's when that one exists."""
        plain = f"fedbiomed-vpn-{name}-{self.settings.instance}"
        gpu_service = COMPONENTS[name].gpu_service if name in COMPONENTS else None
        if not gpu_service:
            return plain
        if name not in self._variants:
            variant = f"fedbiomed-vpn-{gpu_service}-{self.settings.instance}"
            probe = self.host.probe(
                ["docker", "inspect", "--type", "container", variant]
            )
            self._variants[name] = variant if probe.ok else plain
        return self._variants[name]

    def compose_argv(self, *args) -> list[str]:
        return [
            "docker",
            "compose",
            "--project-name",
            self.project,
            "--project-directory",
            str(self.settings.compose_dir),
            "--env-file",
            str(self.env_file),
            "-f",
            str(self.compose_file),
            *self._gpu_override(),
            *args,
        ]

    def _gpu_override(self) -> list[str]:
        syntax = self.settings["gpu"]["syntax"]
        if syntax == "runtime":
            return []
        if syntax != "devices":
            raise BadInput(
                f"fbm.gpu.syntax is {syntax!r}; use 'runtime' (runtime: nvidia) or "
                f"'devices' (deploy.resources.reservations.devices)"
            )
        return ["-f", str(self.settings.compose_dir / "gpu-devices.yml")]

    def compose(self, *args, hide=False, warn=False):
        return self.host.run(self.compose_argv(*args), hide=hide, warn=warn)

    def compose_env(self) -> dict[str, str]:
        s = self.settings
        vpn, build = s["vpn"], s["build"]
        res, gui = s["researcher"], s["gui"]
        return {
            "FBM_INSTANCE": s.instance,
            "FBM_TAG": s.tag,
            "FBM_MOUNTS": str(s.mounts),
            "FBM_SOURCE_HASH": self.source_hash(),
            "FBM_LAYER_HASH": self.image_hash("fbm"),
            **s.identity.env(),
            "BASE_IMAGE": self.base_image(),
            "FEDBIOMED_VERSION": s["fedbiomed_version"],
            "TORCH_INDEX_URL": build["torch_index"],
            "FBM_FROM": self.component_base(),
            "VPN_SERVER_PORT": str(vpn["port"]),
            "VPN_SERVER_BIND": vpn["bind"],
            "USE_WG_KERNEL_MOD": "true" if vpn["kernel_module"] else "false",
            "NODE_GPU_RUNTIME": "nvidia" if s["gpu"]["syntax"] == "runtime" else "runc",
            "RESEARCHER_HOST": res["host"],
            "JUPYTER_PORT": str(res["jupyter_port"]),
            "TENSORBOARD_PORT": str(res["tensorboard_port"]),
            "GUI_HOST": gui["host"],
            "GUI_HTTPS_PORT": str(gui["https_port"]),
            "GUI_HTTP_PORT": str(gui["http_port"]),
            "GUI_SERVER_NAME": gui["server_name"],
        }

    def write_compose_env(self) -> None:
        """Write the variables compose reads, so echoed commands can be replayed."""
        text = templates.render("compose.env.j2", values=self.compose_env())
        if self.host.write_text(self.env_file, text, 0o644) and not self.host.dry:
            self.say(f"wrote {self.env_file}")

    # -- engine --------------------------------------------------------------

    def check_engine(self) -> None:
        """Fail with the fix when Docker or Compose v2 is missing."""
        version = self.host.probe(
            ["docker", "version", "--format", "{{.Server.Version}}"]
        )
        if version.exited == 127:
            raise EngineError(
                "the docker command is not installed; install Docker "
                "(Debian/Ubuntu: `sudo apt-get install docker.io`)"
            )
        if not version.ok:
            detail = (version.stderr or version.stdout or "").strip().splitlines()
            raise EngineError(
                f"no Docker engine answers ({detail[-1] if detail else 'no output'}); "
                f"start it (`sudo systemctl start docker`) or check DOCKER_HOST and "
                f"that your account may use it (group `docker`)"
            )
        compose = self.host.probe(["docker", "compose", "version", "--short"])
        if compose.ok and compose.stdout.strip().lstrip("v")[:1] >= "2":
            return
        legacy = self.host.probe(["docker-compose", "--version"])
        found = f" (found {legacy.stdout.strip()})" if legacy.ok else ""
        raise EngineError(
            f"Docker Compose v2 (`docker compose`) is required{found}; install the "
            f"plugin: `sudo apt-get install docker-compose-plugin` or see "
            f"https://docs.docker.com/compose/install/linux/"
        )

    def current_images(self, names) -> set[str]:
        """Those of `names` whose image exists, built from the current sources
        (one `docker image inspect` for all)."""
        label = '{{json .RepoTags}} {{index .Config.Labels "org.fedbiomed.vpn.source"}}'
        refs = {self.image(name): name for name in names}
        probe = self.host.probe(["docker", "image", "inspect", "-f", label, *refs])
        current = set()
        for line in (probe.stdout or "").splitlines():
            tags, _, digest = line.rpartition(" ")
            for tag in json.loads(tags or "[]"):
                if tag in refs and digest == self.image_hash(refs[tag]):
                    current.add(refs[tag])
        return current

    def image_hash(self, name: str) -> str:
        """What image `name` is built from, as its label should read. The fbm
        layer depends only on its Dockerfile and build values, so a code change
        does not reinstall Fed-BioMed."""
        if name != "fbm":
            return self.source_hash()
        dockerfile = PROJECT_ROOT / "envs" / "vpn" / "docker" / "fbm" / "Dockerfile"
        return source_hash(
            self.base_image(),
            self.settings["fedbiomed_version"],
            self.settings["build"]["torch_index"],
            hashlib.sha256(dockerfile.read_bytes()).hexdigest(),
            files=False,
        )

    def source_hash(self) -> str:
        build = self.settings["build"]
        return source_hash(
            self.base_image(),
            self.settings["fedbiomed_version"],
            build["torch_index"],
            self.component_base(),
        )

    def component_base(self) -> str:
        """The image node, researcher and gui start from."""
        return "basefbm" if self.settings["build"]["fedbiomed"] else "base"

    def base_image(self) -> str:
        """The base OS image; `auto` prefers what this engine already holds:
        the official image, else the one `build.base-os` made, else the
        official one (pulled)."""
        chosen = self.settings["build"]["base_image"]
        if chosen != "auto":
            return chosen
        if self._base is None:
            self._base = OFFICIAL_BASE
            for candidate in (OFFICIAL_BASE, LOCAL_BASE):
                if self.host.probe(["docker", "image", "inspect", candidate]).ok:
                    self._base = candidate
                    break
        return self._base

    # -- build ---------------------------------------------------------------

    def build(self, names, force=False, ca_bundle=None, wheelhouse=None) -> list[str]:
        """Build the images in `names` (and their bases) that are missing."""
        order = image_order(names, self.settings["build"]["fedbiomed"])
        self.write_compose_env()
        self._stage_ca_bundle(ca_bundle)
        if "fbm" in order:
            self._stage_wheelhouse(wheelhouse)
        built = []
        current = set() if force else self.current_images(order)
        for name in order:
            service = IMAGES[name][0]
            if name in current:
                self.say(f"image {self.image(name)} up to date; skipped")
                continue
            note = " (Fed-BioMed and torch: several minutes the first time)"
            self.say(f"building {self.image(name)}{note if name == 'fbm' else ''}")
            result = self.compose("build", service, warn=True)
            if not result.ok:
                raise EngineError(
                    f"building {self.image(name)} failed (see the build output above); "
                    f"fix the cause and run the same task again"
                )
            built.append(name)
        return built

    def _stage_wheelhouse(self, wheelhouse) -> None:
        """Put the wheels of an offline build where the fbm image's build sees
        them (the build folder's wheelhouse/), or empty that folder."""
        target = self.settings.compose_dir / ".build" / "wheelhouse"
        source = wheelhouse or self.settings["build"]["wheelhouse"]
        wheels = []
        if source:
            source = Path(source).expanduser()
            listing = self.host.probe(
                ["find", source, "-maxdepth", "1", "-name", "*.whl"]
            )
            if not listing.ok:
                raise BadInput(f"wheelhouse {source} is not a readable folder")
            wheels = sorted(listing.stdout.splitlines())
            if not wheels:
                raise BadInput(
                    f"wheelhouse {source} holds no .whl file; fill it on a machine "
                    f"with PyPI access: `pip download -d {source} "
                    f"'fedbiomed[node,researcher,gui]=="
                    f"{self.settings['fedbiomed_version']}' 'setuptools<81'`"
                )
        self.host.remove_tree(target)
        self.host.mkdir(target)
        if wheels:
            self.say(f"staging {len(wheels)} wheels from {source} (offline build)")
            self.host.run(["cp", "--reflink=auto", *wheels, target], hide=True)

    def _stage_ca_bundle(self, ca_bundle) -> None:
        target = self.settings.compose_dir / ".build" / "extra-ca.crt"
        text = ""
        path = ca_bundle or self.settings["build"]["ca_bundle"]
        if path:
            path = Path(path).expanduser()
            if not path.is_file():
                raise BadInput(f"CA bundle {path} does not exist; give a PEM file")
            text = path.read_text()
            if "-----BEGIN CERTIFICATE-----" not in text:
                raise BadInput(f"CA bundle {path} holds no PEM certificate")
        self.host.write_text(target, text, 0o644)

    def bootstrap_base_os(self, tag: str, mirror: str, force=False) -> bool:
        """Make a Debian base image with debootstrap; False when it exists."""
        if not force and self.host.probe(["docker", "image", "inspect", tag]).ok:
            return False
        if not self.host.probe(["sh", "-c", "command -v debootstrap"]).ok:
            raise EngineError(
                "debootstrap is not installed; `sudo apt-get install debootstrap`"
            )
        workdir = self.host.probe(["mktemp", "-d", "/tmp/fbm-base-os.XXXXXX"])
        workdir = Path(workdir.stdout.strip())
        rootfs, archive = workdir / "rootfs", workdir / "rootfs.tar"
        try:
            self.say(f"debootstrap bookworm from {mirror} (about a minute)")
            steps = (
                ["debootstrap", "--variant=minbase", "bookworm", rootfs, mirror],
                ["tar", "-C", rootfs, "-cf", archive, "."],
                ["docker", "import", archive, tag],
            )
            for argv in steps:
                if not self.host.run(argv, hide="stdout", warn=True).ok:
                    raise EngineError(
                        f"`{argv[0]}` failed (output above); debootstrap needs root "
                        f"and access to {mirror}"
                    )
        finally:
            self.host.run(["rm", "-rf", workdir], hide=True, warn=True)
        return True

    # -- containers ----------------------------------------------------------

    def prepare_mounts(self, name: str) -> None:
        for sub in component(name).mounts:
            self.host.mkdir(self.run_mounts(name) / sub)

    def state(self, name: str) -> str:
        """`running`, `restarting`, `exited`..., or `absent`."""
        probe = self.host.probe(
            ["docker", "inspect", "--format", "{{.State.Status}}", self.container(name)]
        )
        return probe.stdout.strip() if probe.ok else "absent"

    def up(self, name: str, gpu: bool = False) -> None:
        comp = component(name)
        configured = self.host.exists(self.peer_env_path(name))
        if comp.is_peer and not configured and not self.host.dry:
            raise StateError(
                f"{name} has no VPN config yet ({self.peer_env_path(name)}); "
                f"run `invoke peer.join {name}` (it generates, copies and starts)"
            )
        service = comp.gpu_service if gpu else name
        if gpu and not service:
            raise BadInput(f"{name} has no GPU variant")
        if gpu:
            self.gpu_preflight()
        if name == "researcher":
            self.check_researcher_host()
        self.write_compose_env()
        self.prepare_mounts(name)
        other = name if gpu else comp.gpu_service
        if other and self.container(name).startswith(f"fedbiomed-vpn-{other}-"):
            self.say(f"replacing the running {other} container by {service}")
            self.compose("rm", "--stop", "--force", other)
        self._variants.pop(name, None)
        result = self.compose("up", "-d", "--no-build", service, warn=True)
        if not result.ok:
            error = (result.stderr or "").strip()
            from . import gpu as gpu_checks  # loaded only on this path

            advice = gpu_checks.translate_error(error)
            if advice:
                raise EngineError(f"starting {service} failed: {advice}")
            hint = f"see `docker logs {self.container(name)}`"
            if (
                "port is already allocated" in error
                or "address already in use" in error
            ):
                hint = (
                    "another program holds that port; stop it or choose other ports "
                    "(fbm.vpn.port, fbm.researcher.*_port, fbm.gui.*_port)"
                )
            elif "No such image" in error:
                hint = "build it first: `invoke build`"
            last = [line for line in error.splitlines() if line.strip()][-3:]
            raise EngineError(f"starting {service} failed: {' '.join(last)}; {hint}")
        self.wait_ready(name)

    def check_researcher_host(self) -> None:
        """Refuse to publish Jupyter and tensorboard beyond this machine
        (fbm.researcher.host not loopback) without fbm.researcher.expose."""
        from .fedbiomed import check_web_host  # the rule of researcher.up

        res = self.settings["researcher"]
        check_web_host(res["host"], bool(res.get("expose")), "fbm.researcher.host")

    def gpu_preflight(self) -> None:
        """Refuse to start a GPU container when the host cannot run it."""
        from . import gpu as gpu_checks

        cuda = gpu_checks.resolve_cuda(
            self.gpu_runner(), self.settings["gpu"]["cuda_version"], self.image("node")
        )
        checks = gpu_checks.run_checks(
            self.gpu_runner(),
            cuda,
            nvidia_runtime=self.settings["gpu"]["syntax"] == "runtime",
        )
        if gpu_checks.failed(checks):
            raise EngineError(
                "this host cannot run a GPU node; nothing was started or changed.\n"
                + gpu_checks.render_table(checks)
            )

    def gpu_runner(self):
        """The GPU checks' runner over this stack's host (read-only probes)."""

        def run(argv):
            outcome = self.host.probe(argv)
            return outcome.exited, outcome.stdout or "", outcome.stderr or ""

        return run

    def down(self, name: str) -> None:
        self.write_compose_env()
        self.compose("stop", *component(name).services)

    def wait_ready(self, name: str, timeout: float | None = None) -> None:
        """Wait until the entrypoint marked the container ready (bounded)."""
        if self.host.dry:
            return
        timeout = timeout or self.settings["wait_timeout"]
        deadline = time.monotonic() + float(timeout)
        while time.monotonic() < deadline:
            state = self.state(name)
            ready = ["test", "-f", "/run/fbm-vpn/ready"]
            if state == "running" and self.exec_ok(name, ready):
                return
            if state in ("exited", "dead", "absent"):
                break
            time.sleep(0.5)
        logs = self.host.probe(["docker", "logs", "--tail", "15", self.container(name)])
        tail = (logs.stdout or "") + (logs.stderr or "")
        raise EngineError(
            f"{name} is not ready after {timeout} s (state: {self.state(name)}); "
            f"last log lines:\n{tail.strip()}"
        )

    def exec_ok(self, name: str, argv) -> bool:
        return self.host.probe(["docker", "exec", self.container(name), *argv]).ok

    def exec(self, name: str, argv, *, hide=True, warn=False, stdin=None, probe=False):
        command = ["docker", "exec"] + (["-i"] if stdin is not None else [])
        command += [self.container(name), *argv]
        if probe:
            return self.host.probe(command)
        return self.host.run(command, hide=hide, warn=warn, stdin=stdin)

    # -- VPN server ----------------------------------------------------------

    def server_config(self) -> Path:
        return self.run_mounts("vpnserver") / "config" / "config.env"

    def vpnserver_init(self, public_addr: str | None = None, force=False) -> bool:
        """Write the server's config.env; False when it exists and stays."""
        path = self.server_config()
        if public_addr:
            check_address(public_addr)
        if self.host.exists(path) and not force:
            self.say(f"{path} exists; kept (use --force to rewrite it)")
            return False
        vpn = self.settings["vpn"]
        public_addr = public_addr or vpn["public_addr"] or self.detect_public_addr()
        check_address(public_addr)
        if is_loopback(public_addr):
            self.say(
                f"warning: {public_addr} is a loopback address: peers in containers "
                f"or on other machines cannot reach the server there"
            )
        text = templates.render(
            "vpnserver-config.env.j2",
            public_addr=public_addr,
            port=int(vpn["port"]),
            server_ip=vpn["server_ip"],
            prefix=int(vpn["prefix"]),
            assign=vpn["assign"],
            kernel_module=bool(vpn["kernel_module"]),
        )
        self.host.mkdir(path.parent)
        self.host.write_text(path, text, 0o644)
        self.say(f"wrote {path} (public address {public_addr}:{vpn['port']})")
        return True

    def detect_public_addr(self) -> str:
        """The address of the interface holding the default route."""
        probe = self.host.probe(["ip", "-4", "route", "get", "192.0.2.255"])
        words = (probe.stdout or "").split()
        if probe.ok and "src" in words:
            return words[words.index("src") + 1]
        raise StateError(
            "cannot detect this machine's address; pass --public-addr ADDR "
            "(the address peers use to reach this machine)"
        )

    def peer_tool(self, *args, stdin=None, hide=True, warn=False, probe=False):
        """Run the server's peer tool; a refusal becomes a StateError.

        `probe=True` for read-only verbs: no echo, and it runs in a dry run too.
        """
        result = self.exec(
            "vpnserver",
            ["configure_peer", *args],
            hide=hide or "stderr",  # a refusal is raised below, not printed twice
            warn=True,
            stdin=stdin,
            probe=probe,
        )
        if result.ok or (self.host.dry and not probe):
            return result
        if self.state("vpnserver") != "running":
            raise StateError(
                "the vpnserver container is not running; start it with "
                "`invoke vpnserver.up`"
            )
        if not warn:
            message = (result.stderr or "").strip()
            raise StateError(message.removeprefix("configure_peer: "))
        return result

    # -- peers ---------------------------------------------------------------

    def peer_env_path(self, name: str) -> Path:
        return self.run_mounts(name) / "config" / "config.env"

    def public_key(self, name: str) -> str:
        """The live WireGuard public key of a component (never empty)."""
        if self.host.dry:
            return f"<public key of {name}>"
        result = self.exec(name, ["wg", "show", "wg0", "public-key"], probe=True)
        key = (result.stdout or "").strip()
        if not result.ok or not key or key == "(none)":
            raise EngineError(f"{name} has no WireGuard key yet; see `invoke status`")
        return key

    def join(self, name: str, peer_id: str, gpu: bool = False, server=None) -> str:
        """Generate, copy, start, register and check a component of this host.

        `server` is the Stack of the VPN server's host (this one by default):
        the peer tool runs there, the component here; the config crosses
        between them in memory, never printed.
        """
        server = server or self
        comp = component(name)
        if not comp.is_peer:
            raise BadInput(f"{name} is not a VPN peer")
        registry.check_peer_id(peer_id)
        if name == "researcher":
            self.check_researcher_host()  # before anything changes
        ptype = comp.peer_type

        # One call generates the config when missing and hands it over.
        shown = server.peer_tool(
            "genconf", ptype, peer_id, "--reuse", "--print", hide=True
        )
        if shown.stdout is not None:
            self.say((shown.stderr or "").strip() or f"config of {ptype} {peer_id}")

        self._check_owner(name, ptype, peer_id)
        changed = False
        if shown.stdout is not None:
            text = shown.stdout if shown.stdout.endswith("\n") else shown.stdout + "\n"
            self.prepare_mounts(name)
            changed = self.host.write_text(self.peer_env_path(name), text, 0o600)
            if changed and not self.host.dry:
                self.say(f"copied the config into {self.peer_env_path(name)}")

        was_running = changed and self.state(name) == "running"
        self.up(name, gpu=gpu)
        if changed and was_running:
            self.say(f"restarting {name} to load its new VPN config")
            self.compose("restart", comp.gpu_service if gpu else name)
            self.wait_ready(name)

        key = self.public_key(name)
        server.peer_tool("add", ptype, peer_id, key, hide=False)
        server_ip = self.settings["vpn"]["server_ip"]
        if not self.host.dry and not self.wait_ping(name, server_ip):
            raise EngineError(
                f"{name} does not reach the VPN server at {server_ip}; check that "
                f"UDP {self.settings['vpn']['port']} on the server's public address "
                f"is reachable from {name} (`invoke status` names the broken hop)"
            )
        return key

    def _check_owner(self, name: str, ptype: str, peer_id: str) -> None:
        """Refuse to overwrite a component's config that belongs to another peer."""
        path = self.peer_env_path(name)
        if not self.host.exists(path):
            return
        values = envfile.parse(self.host.read_text(path), str(path))
        owner = (values.get("FBM_PEER_TYPE"), values.get("FBM_PEER_ID"))
        if owner != (ptype, peer_id) and all(owner):
            raise StateError(
                f"{path} on {self.host.name} belongs to {owner[0]} {owner[1]}, not "
                f"{ptype} {peer_id}; join with that id, or remove it first "
                f"(`clean {name} --level config`)"
            )

    def ping(self, name: str, target: str, count: int = 3) -> bool:
        if self.host.dry:
            return True
        argv = ["ping", "-c", str(count), "-W", "2", "-q", target]
        return self.exec(name, argv, probe=True).ok

    def wait_ping(self, name: str, target: str, timeout: float = 30) -> bool:
        """Ping until an answer comes (bounded).

        A peer whose key was just registered answers after its next handshake
        attempt; WireGuard retries every 5 seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.ping(name, target, count=1):
                return True
            if time.monotonic() >= deadline:
                return False

    def vpn_ip(self, name: str) -> str | None:
        path = self.peer_env_path(name)
        if not self.host.exists(path):
            return None
        return envfile.parse(self.host.read_text(path)).get("VPN_IP")

    def handshake_age(self, name: str) -> float | None:
        result = self.exec(name, ["wg", "show", "wg0", "latest-handshakes"], probe=True)
        stamps = [
            int(line.split("\t")[1])
            for line in (result.stdout or "").splitlines()
            if "\t" in line
        ]
        stamp = max(stamps, default=0)
        return time.time() - stamp if stamp else None

    # -- status --------------------------------------------------------------

    def status(self, names=None) -> list[dict]:
        """One row per component: state, VPN address, pings, handshake age."""
        server_ip = self.settings["vpn"]["server_ip"]
        researcher_ip = self.vpn_ip("researcher")
        rows = []
        for name in names or COMPONENTS:
            comp = component(name)
            state = self.state(name)
            row = {"component": name, "state": state, "ok": state == "running"}
            if comp.is_peer and state != "absent":
                row["vpn_ip"] = self.vpn_ip(name)
                up = state == "running"
                row["ping_server"] = up and self.ping(name, server_ip, 1)
                age = self.handshake_age(name) if up else None
                row["handshake_age_s"] = None if age is None else round(age)
                row["ok"] = bool(row["ping_server"])
                if comp.peer_type == "node" and up:
                    row["gpu"] = self.exec(name, ["nvidia-smi", "-L"], probe=True).ok
                if comp.peer_type == "node" and researcher_ip and up:
                    row["ping_researcher"] = self.ping(name, researcher_ip, 1)
                    row["ok"] = row["ok"] and row["ping_researcher"]
            if state == "absent":
                row["ok"] = None  # not deployed here: not a failure
            rows.append(row)
        return rows

    # -- clean ---------------------------------------------------------------

    def clean_targets(self, name: str, level: str, datasets: bool = False):
        """The folders `clean` deletes at `level`: the component's run_mounts,
        but user files (data, samples, certs) only with `datasets`."""
        if level not in ("config", "image"):
            return []
        mounts = self.run_mounts(name)
        return [
            mounts / sub
            for sub in component(name).mounts
            if datasets or sub not in USER_FILES
        ]

    def clean(self, name: str, level: str, datasets: bool = False) -> list[str]:
        """Remove a component's container, then config, then image; say what."""
        comp = component(name)
        check_level(level)
        done = []
        self.write_compose_env()
        container = self.container(name)
        existed = self.state(name) != "absent"
        self.compose("rm", "--stop", "--force", *comp.services)
        self._variants.pop(name, None)
        if existed:
            done.append(f"container {container}")
        for target in self.clean_targets(name, level, datasets):
            if self.host.exists(target):
                self.host.remove_tree(target)
                done.append(str(target))
        if level == "image":
            image = self.image(comp.image)
            if self.host.probe(["docker", "image", "inspect", image]).ok:
                self.host.run(["docker", "image", "rm", image], warn=True)
                done.append(f"image {image}")
        return done


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)


@cache
def source_hash(*build_values: str, files: bool = True) -> str:
    """A digest of what the images are built from (library, templates,
    Dockerfiles, base images), so that a change means a rebuild; `files=False`:
    of the build values only."""
    sources = []
    if files:
        sources = sorted(
            [
                *PROJECT_ROOT.glob("fbmvpn/**/*.py"),
                *PROJECT_ROOT.glob("templates/*"),
                *PROJECT_ROOT.glob("envs/vpn/docker/*/Dockerfile"),
            ]
        )
    digest = hashlib.sha256("\0".join(build_values).encode())
    for path in sources:
        digest.update(str(path.relative_to(PROJECT_ROOT)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


CLEAN_LEVELS = ("container", "config", "image")
# run_mounts folders holding the user's own files: kept by `clean` unless asked
USER_FILES = ("data", "samples", "certs")


def check_level(level: str) -> str:
    if level not in CLEAN_LEVELS:
        raise BadInput(
            f"unknown level {level!r}; use one of: {', '.join(CLEAN_LEVELS)}"
        )
    return level


def check_address(text: str) -> str:
    """Accept an IP address or a DNS name for the server's public address."""
    try:
        if ipaddress.ip_address(text).is_unspecified:
            raise BadInput(
                f"{text} means 'any address' and cannot be reached; give the address "
                f"peers use to reach the VPN server, e.g. --public-addr 203.0.113.7"
            )
    except ValueError:
        if not _HOSTNAME.match(text or "") or text.rsplit(".", 1)[-1].isdigit():
            raise BadInput(
                f"{text!r} is neither an IP address nor a host name; give the "
                f"address peers use to reach the VPN server, e.g. "
                f"--public-addr 203.0.113.7"
            ) from None
    return text


def is_loopback(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return text == "localhost"
