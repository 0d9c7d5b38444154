"""Settings of a deployment: the defaults, declared once, and their resolution.

Invoke loads DEFAULTS under the `fbm` key (tasks/__init__.py), so invoke.yaml,
`INVOKE_FBM_*` variables and task flags override any of them; the Fabric entry
points read the same keys.
"""

import getpass
import grp
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput

PROJECT_ROOT = Path(__file__).resolve().parent.parent

DEFAULTS = {
    "instance": "main",
    "tag": "latest",
    "fedbiomed_version": "6.4.1",
    "compose_dir": "envs/vpn/docker",
    "mounts": "",
    "identity": {"uid": None, "gid": None, "user": None, "group": None},
    "build": {
        # auto: debian:bookworm-slim if present here, else the local image that
        # `invoke build.base-os` makes, else debian:bookworm-slim (pulled)
        "base_image": "auto",
        "ca_bundle": "",
        # false: node, researcher and gui without Fed-BioMed (VPN only, small)
        "fedbiomed": True,
        # a folder of wheels: install Fed-BioMed from it only (offline build)
        "wheelhouse": "",
        # a package index for torch and torchvision (e.g. PyTorch's CPU one)
        "torch_index": "",
    },
    "vpn": {
        "public_addr": "",
        "port": 51820,
        "bind": "0.0.0.0",
        "server_ip": "10.220.0.1",
        "prefix": 14,
        "assign": {
            "management": "10.220.0.0/16",
            "node": "10.221.0.0/16",
            "researcher": "10.222.0.0/16",
        },
        "kernel_module": True,
    },
    "peers": {"node": "node1", "node2": "node2", "researcher": "researcher1"},
    "researcher": {
        # where Jupyter and tensorboard are published; any address but a
        # loopback one needs expose: true (or --expose), a deliberate choice
        "host": "127.0.0.1",
        "expose": False,
        "jupyter_port": 8888,
        "tensorboard_port": 6006,
    },
    # host: the address the ports are published on (GUI_SERVER_IP of the
    # manual); server_name: what users type in their browser, put in the
    # self-signed certificate (GUI_SERVER_NAME)
    "gui": {
        "host": "127.0.0.1",
        "https_port": 8443,
        "http_port": 8484,
        "server_name": "localhost",
        "expose": False,
    },
    "wait_timeout": 90,
    # Remote machines (fab): where run files live, and the inventory, a list of
    # {host: "user@name:port", role: network|node|researcher|gui, id: ..., dir: ...}
    "remote": {"dir": "fbm-vpn", "accept_new_host": False},
    "hosts": [],
    # cuda_version auto: the release the node image's torch was built for
    # (read from the image; 12.1.1 before it is built)
    "gpu": {"cuda_version": "auto", "syntax": "runtime"},
}

_INSTANCE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")


def sanitize_name(name: str) -> str:
    """Account names as the manual makes them: every non-alphanumeric becomes _."""
    return re.sub(r"[^A-Za-z0-9]", "_", name)


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    user: str
    group: str

    @classmethod
    def of_caller(cls) -> "Identity":
        gid = os.getgid()
        return cls(
            uid=os.getuid(),
            gid=gid,
            user=sanitize_name(getpass.getuser()),
            group=sanitize_name(grp.getgrgid(gid).gr_name),
        )

    def env(self) -> dict[str, str]:
        return {
            "CONTAINER_UID": str(self.uid),
            "CONTAINER_GID": str(self.gid),
            "CONTAINER_USER": self.user,
            "CONTAINER_GROUP": self.group,
        }


@dataclass
class Settings:
    """Resolved settings: plain values and absolute paths."""

    raw: dict
    instance: str
    tag: str
    compose_dir: Path
    mounts: Path
    identity: Identity

    @classmethod
    def from_config(cls, fbm) -> "Settings":
        raw = _plain(fbm)
        instance = str(raw["instance"])
        if not _INSTANCE.match(instance):
            raise BadInput(
                f"instance id {instance!r} is not allowed; use up to 31 lowercase "
                f"letters, digits, '-' or '_', starting with a letter or digit"
            )
        tcp: dict[int, str] = {}
        for key, value in _ports(raw):
            if not str(value).isdigit() or not 0 < int(value) < 65536:
                raise BadInput(f"{key}={value!r} is not a port number (1 to 65535)")
            if key != "fbm.vpn.port":  # the VPN's is UDP; the others TCP
                if int(value) in tcp:
                    raise BadInput(
                        f"{key} and {tcp[int(value)]} are both {value}; give each "
                        f"web port its own number"
                    )
                tcp[int(value)] = key
        compose_dir = PROJECT_ROOT / raw["compose_dir"]
        mounts = Path(raw["mounts"]).expanduser() if raw["mounts"] else compose_dir
        ident = raw["identity"]
        caller = Identity.of_caller()
        identity = Identity(
            uid=int(ident["uid"] if ident["uid"] is not None else caller.uid),
            gid=int(ident["gid"] if ident["gid"] is not None else caller.gid),
            user=sanitize_name(ident["user"] or caller.user),
            group=sanitize_name(ident["group"] or caller.group),
        )
        return cls(
            raw=raw,
            instance=instance,
            tag=str(raw["tag"]),
            compose_dir=compose_dir,
            mounts=mounts.resolve(),
            identity=identity,
        )

    def __getitem__(self, key):
        return self.raw[key]


def _ports(raw: dict):
    yield "fbm.vpn.port", raw["vpn"]["port"]
    for section in ("researcher", "gui"):
        for key, value in raw[section].items():
            if key.endswith("_port"):
                yield f"fbm.{section}.{key}", value


def _plain(value):
    """Invoke's DataProxy objects as plain dicts."""
    if hasattr(value, "items"):
        return {key: _plain(item) for key, item in value.items()}
    return value
