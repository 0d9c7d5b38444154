"""Ship a Docker image from this machine's engine to the engine of a target host.

Two ways, as issue 4 asks:

- streaming (`transfer_image`): the image goes as a gzip stream straight into
  `docker load` on the target, over SSH or into another engine of this machine,
  with no temporary file on either side. Nothing is sent when the target already
  has the image; otherwise only the layers the target lacks are put in the
  archive (`docker load` takes a layer whose chain it holds from its own store).
  The loaded image ID and tags are checked afterwards; if the target refuses the
  partial archive, the full image is sent instead.
- via files (`ship_via_files`): the manual's two artifacts
  (`vpn-node-image.tar.gz`, `vpn-node-files.tar.gz`), copied to the target,
  loaded and unpacked there, for people who must carry files by hand.

The archive comes from the engine's own layer store when the engine runs on this
machine with overlay2 and its files can be read (each layer is rebuilt from the
tar-split record docker keeps, and checked against its diff ID while it is
sent), else from `docker save`, whose tar stream is filtered on the fly.

A target is `LocalTarget` (an engine of this machine, e.g. a second one reached
through DOCKER_HOST) or `SshTarget` (a Fabric Connection). Both offer
`run`/`probe` like `fbmvpn.host.LocalHost`, plus `open_stream(argv)`, the data
path, and `put(local, remote)` for whole files.
"""

import base64
import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import docker
import paramiko
from tqdm import tqdm

from .errors import BadInput, EngineError, FbmVpnError, StateError
from .host import Outcome
from .remote import connect_error

try:  # ISA-L's deflate: the same gzip format for a fifth of zlib's CPU time
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is in requirements.txt
    isal_zlib = None

log = logging.getLogger(__name__)

CHUNK = 1 << 20
BLOCK = 512
# Files a run-files bundle never carries: VPN keys and peer settings of this machine.
EXCLUDED_RUN_FILES = ("wg0.conf", "config.env")
NODE_COMPOSE_NAME = "docker-compose_run_node.yml"
COMPOSE_NAME = "docker-compose.yml"


def gzip_compressor(level: int):
    """A gzip-format compressor; `level` on zlib's 0-9 scale (0: stored).

    ISA-L is used when installed: its levels 1-3 stand for zlib's 1-3, 4-6, 7-9.
    """
    if not 0 <= level <= 9:
        raise BadInput(f"compression level {level} is not between 0 and 9")
    if isal_zlib is None or level == 0:
        return zlib.compressobj(level, zlib.DEFLATED, 31)
    return isal_zlib.compressobj((level + 2) // 3, zlib.DEFLATED, 31)


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def human(size: float) -> str:
    """Bytes in a short human form (1.5 MB)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


# --- targets -----------------------------------------------------------------


class Interrupted(Exception):
    """The data path broke before `docker load` on the target reported back."""


class LoadEndedEarly(Exception):
    """`docker load` on the target stopped before the end of the data."""

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.stderr)
        self.outcome = outcome


class LoadStream:
    """Base of the data paths: bytes in, `docker load`'s outcome out."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def finish(self) -> Outcome:
        """Signal the end of the data and wait for the command's result."""
        raise NotImplementedError

    def abort(self) -> None:
        """Stop without a clean end; the gzip stream is then truncated."""
        raise NotImplementedError


class ProcessStream(LoadStream):
    """A local command fed through its stdin."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]):
        self.command = shlex.join(argv)
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
        )
        self._out: dict[str, bytes] = {}
        self._readers = [
            threading.Thread(target=self._drain, args=(name,), daemon=True)
            for name in ("stdout", "stderr")
        ]
        for reader in self._readers:
            reader.start()

    def _drain(self, name: str) -> None:
        self._out[name] = getattr(self.process, name).read()

    def write(self, data: bytes) -> None:
        try:
            self.process.stdin.write(data)
        except (BrokenPipeError, ValueError):
            raise LoadEndedEarly(self.finish()) from None

    def finish(self) -> Outcome:
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        code = self.process.wait()
        for reader in self._readers:
            reader.join()
        if code < 0:
            raise Interrupted(f"`{self.command}` was killed by signal {-code}")
        stdout = self._out.get("stdout", b"").decode(errors="replace")
        stderr = self._out.get("stderr", b"").decode(errors="replace")
        return Outcome(code == 0, stdout, stderr, code)

    def abort(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        self.process.wait()


class SshStream(LoadStream):
    """A remote command on an SSH session channel, fed through its stdin."""

    def __init__(self, transport: paramiko.Transport, command: str):
        self.command = command
        self.transport = transport
        self.channel = transport.open_session()
        self.channel.exec_command(command)

    def _lost(self) -> bool:
        return not self.transport.is_active()

    def write(self, data: bytes) -> None:
        try:
            self.channel.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as error:
            if self._lost():
                raise Interrupted(f"the SSH connection was lost ({error})") from None
            raise LoadEndedEarly(self.finish()) from None

    def finish(self) -> Outcome:
        try:
            if not self.channel.closed:
                self.channel.shutdown_write()
            stdout = self.channel.makefile("rb").read()
            stderr = self.channel.makefile_stderr("rb").read()
            code = self.channel.recv_exit_status()
        except (OSError, EOFError, paramiko.SSHException) as error:
            raise Interrupted(f"the SSH connection was lost ({error})") from None
        finally:
            self.channel.close()
        if code == -1:
            why = "was lost" if self._lost() else "closed without an exit status"
            raise Interrupted(f"the SSH session {why} before `{self.command}` ended")
        return Outcome(
            code == 0,
            stdout.decode(errors="replace"),
            stderr.decode(errors="replace"),
            code,
        )

    def abort(self) -> None:
        self.channel.close()


class LocalTarget:
    """A Docker engine of this machine: this one, or another through `docker_host`.

    `docker` is the command prefix for the engine's CLI (e.g. sudo -n docker).
    """

    def __init__(
        self, docker_host: str | None = None, docker: Sequence[str] = ("docker",)
    ):
        self.docker_host = docker_host
        self.docker_cmd = list(docker)
        self.name = f"local engine {docker_host}" if docker_host else "this machine"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.docker_host:
            env["DOCKER_HOST"] = self.docker_host
        return env

    def docker(self, *args: str) -> list[str]:
        return [*self.docker_cmd, *args]

    def run(self, argv, *, hide=True, warn=False, stdin=None) -> Outcome:
        argv = [str(arg) for arg in argv]
        log.debug("%s: %s", self.name, shlex.join(argv))
        try:
            done = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, env=self._env()
            )
        except FileNotFoundError:
            outcome = Outcome(False, "", f"{argv[0]}: command not found", 127)
        else:
            outcome = Outcome(
                done.returncode == 0, done.stdout, done.stderr, done.returncode
            )
        if not hide:
            sys.stdout.write(outcome.stdout or "")
            sys.stderr.write(outcome.stderr)
        if not outcome.ok and not warn:
            raise EngineError(_failed(self.name, argv, outcome))
        return outcome

    def probe(self, argv) -> Outcome:
        return self.run(argv, hide=True, warn=True)

    def open_stream(self, argv) -> LoadStream:
        return ProcessStream([str(arg) for arg in argv], self._env())

    def put(self, local: Path, remote: str) -> None:
        shutil.copyfile(local, remote)

    def reconnect(self) -> None:
        """Nothing to do for this machine."""


class SshTarget:
    """A host reached over SSH through a Fabric Connection (opened when needed).

    `docker_host` sets DOCKER_HOST for the docker commands run there; host keys,
    user, port and jump hosts are the Connection's business.
    """

    def __init__(
        self,
        connection,
        docker_host: str | None = None,
        docker: Sequence[str] = ("docker",),
    ):
        self.connection = connection
        self.docker_host = docker_host
        self.docker_cmd = list(docker)
        self.name = f"{connection.user}@{connection.host}:{connection.port}"

    def docker(self, *args: str) -> list[str]:
        prefix = ["env", f"DOCKER_HOST={self.docker_host}"] if self.docker_host else []
        return [*prefix, *self.docker_cmd, *args]

    def connect(self) -> paramiko.Transport:
        """Open the connection if needed; its transport."""
        if not self.connection.is_connected:
            try:
                self.connection.open()
            except Exception as error:  # paramiko and socket raise many kinds
                raise connect_error(self.name, error) from error
            self.connection.transport.set_keepalive(15)
        return self.connection.transport

    def run(self, argv, *, hide=True, warn=False, stdin=None) -> Outcome:
        command = shlex.join(str(arg) for arg in argv)
        log.debug("%s: %s", self.name, command)
        self.connect()
        in_stream = io.StringIO(stdin) if stdin is not None else False
        try:
            result = self.connection.run(
                command, hide=hide, warn=True, in_stream=in_stream
            )
        except (OSError, EOFError, paramiko.SSHException) as error:
            raise EngineError(
                f"the SSH connection to {self.name} failed while running "
                f"`{command}`: {error}; check the host and retry"
            ) from error
        outcome = Outcome(result.ok, result.stdout, result.stderr, result.exited)
        if not outcome.ok and not warn:
            raise EngineError(_failed(self.name, argv, outcome))
        return outcome

    def probe(self, argv) -> Outcome:
        return self.run(argv, hide=True, warn=True)

    def open_stream(self, argv) -> LoadStream:
        transport = self.connect()
        try:
            return SshStream(transport, shlex.join(str(arg) for arg in argv))
        except (OSError, EOFError, paramiko.SSHException) as error:
            raise EngineError(
                f"cannot open an SSH session on {self.name}: {error}; retry"
            ) from error

    def put(self, local: Path, remote: str) -> None:
        self.connect()
        try:
            self.connection.put(str(local), remote)
        except (OSError, EOFError, paramiko.SSHException) as error:
            raise EngineError(
                f"copying {local.name} to {self.name}:{remote} failed: {error}; "
                "check the free space and permissions there, then retry"
            ) from error

    def reconnect(self) -> None:
        self.connection.close()
        self.connect()


def _failed(name: str, argv, outcome: Outcome) -> str:
    said = (outcome.stderr or outcome.stdout or "").strip()[-400:]
    command = shlex.join(str(arg) for arg in argv)
    return f"`{command}` failed on {name} (exit {outcome.exited}): {said}"


def as_target(host):
    """A target for `host`: a target, a Fabric Connection, or a host object.

    A host object holding a Connection (`fbmvpn.remote.RemoteHost`) goes over
    SSH; the library's LocalHost means this machine's engine.
    """
    if isinstance(host, (LocalTarget, SshTarget)) or hasattr(host, "open_stream"):
        return host
    from fabric import Connection

    if isinstance(host, Connection):
        return SshTarget(host)
    for attribute in ("conn", "connection"):  # RemoteHost, or any such wrapper
        connection = getattr(host, attribute, None)
        if isinstance(connection, Connection):
            return SshTarget(connection)
    if hasattr(host, "ctx"):
        return LocalTarget()
    raise BadInput(
        f"cannot ship an image to {host!r}: not a host, target or Connection"
    )


# --- image facts -------------------------------------------------------------


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """Docker's chain ID of each layer position: what `docker load` looks up."""
    chains: list[str] = []
    for diff in diff_ids:
        if chains:
            digest = hashlib.sha256(f"{chains[-1]} {diff}".encode()).hexdigest()
            chains.append(f"sha256:{digest}")
        else:
            chains.append(diff)
    return chains


def normal_tag(ref: str) -> str:
    """`repo` -> `repo:latest`; a reference with a tag stays as it is."""
    if "@" in ref:
        raise BadInput(f"{ref!r} names a digest; give a repository:tag to ship")
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else f"{ref}:latest"


def bundle_name(ref: str) -> str:
    """The manual's file prefix: fedbiomed/vpn-node[:tag] -> vpn-node."""
    return ref.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]


@dataclass
class SourceImage:
    ref: str
    image_id: str
    tags: list[str]
    diff_ids: list[str]
    size: int

    @property
    def chains(self) -> list[str]:
        return chain_ids(self.diff_ids)


def _is_id(ref: str, image_id: str) -> bool:
    bare = ref.removeprefix("sha256:")
    return len(bare) >= 12 and image_id.removeprefix("sha256:").startswith(bare)


def _source_client(docker_host: str | None):
    try:
        if docker_host:
            return docker.DockerClient(base_url=docker_host)
        return docker.from_env()
    except docker.errors.DockerException as error:
        raise EngineError(
            f"cannot talk to this machine's Docker engine: {error}; start it "
            "(scripts/setup.sh does) or set DOCKER_HOST"
        ) from error


def _inspect_source(client, ref: str, tags: Sequence[str] | None) -> SourceImage:
    try:
        data = client.api.inspect_image(ref)
    except docker.errors.ImageNotFound:
        raise BadInput(
            f"there is no image {ref} on this machine; build it first (invoke build)"
        ) from None
    except docker.errors.APIError as error:
        raise EngineError(f"inspecting {ref}: {error.explanation}") from error
    image_id = data["Id"]
    if tags is None:
        tags = [] if _is_id(ref, image_id) else [normal_tag(ref)]
    return SourceImage(
        ref=ref,
        image_id=image_id,
        tags=[normal_tag(tag) for tag in tags],
        diff_ids=list(data["RootFS"]["Layers"]),
        size=int(data.get("Size") or 0),
    )


# --- the target's engine -----------------------------------------------------


def _docker_root(target) -> str:
    """The target's DockerRootDir; a clear error when docker is absent or down."""
    done = target.probe(target.docker("info", "-f", "{{.DockerRootDir}}"))
    if done.exited == 127:
        raise EngineError(
            f"docker is not installed on {target.name}; install Docker there "
            "(docker.io on Debian/Ubuntu) and retry"
        )
    root = (done.stdout or "").strip()
    if not done.ok or not root.startswith("/"):
        said = (done.stderr or done.stdout or "").strip()[-300:]
        if "permission denied" in said.lower():
            raise EngineError(
                f"the Docker engine on {target.name} refuses this user: {said}; add "
                "the user to the docker group there, or run docker through sudo"
            )
        raise EngineError(
            f"the Docker engine on {target.name} does not answer: {said}; "
            "start it there (systemctl start docker) and retry"
        )
    return root


def target_image_id(target, ref: str) -> str | None:
    """The ID of image `ref` on the target, None when it has none."""
    done = target.probe(target.docker("image", "inspect", "-f", "{{.Id}}", ref))
    value = (done.stdout or "").strip()
    return value if done.ok and value.startswith("sha256:") else None


def target_chains(target) -> set[str]:
    """Chain IDs of every layer held by the target's images."""
    listed = target.probe(target.docker("image", "ls", "-a", "-q", "--no-trunc"))
    if not listed.ok:
        raise EngineError(_failed(target.name, ["docker", "image", "ls"], listed))
    ids = sorted(set((listed.stdout or "").split()))
    chains: set[str] = set()
    template = "{{range .RootFS.Layers}}{{.}} {{end}}"
    for start in range(0, len(ids), 200):
        batch = ids[start : start + 200]
        done = target.probe(target.docker("image", "inspect", "-f", template, *batch))
        # An image removed meanwhile fails the call; what was printed still counts.
        for line in (done.stdout or "").splitlines():
            chains.update(chain_ids(line.split()))
    return chains


def parse_df_avail(text: str) -> int:
    """Free bytes from `df -B1 --output=avail DIR`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or lines[0] != "Avail" or not lines[-1].isdigit():
        raise EngineError(f"unexpected df output: {text.strip()[:200]!r}")
    return int(lines[-1])


def free_bytes(target, path: str) -> int | None:
    """Free space under `path` on the target; None when df cannot tell."""
    done = target.probe(["df", "-B1", "--output=avail", path])
    if not done.ok:
        log.debug("df %s on %s failed: %s", path, target.name, done.stderr)
        return None
    return parse_df_avail(done.stdout or "")


def check_space(target, path: str, needed: int, what: str) -> None:
    free = free_bytes(target, path)
    if free is not None and free < needed:
        raise StateError(
            f"not enough disk space on {target.name}: {what} needs about "
            f"{human(needed)} under {path}, {human(free)} is free; free some space "
            "there (docker system df, docker image prune) and retry"
        )


# --- archives ----------------------------------------------------------------


def _pad(size: int) -> int:
    return -size % BLOCK


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


class LayerMismatch(Exception):
    """A layer rebuilt from the local store does not hash to its diff ID."""


class LayerStore:
    """Read-only access to this machine's overlay2 engine's layer store.

    Each layer's tar is rebuilt the way docker rebuilds it for `docker save`:
    the tar-split record gives the headers and padding, the layer's directory
    gives the file contents. The result is hashed as it goes out.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.images = (
            self.root / "image" / "overlay2" / "imagedb" / "content" / "sha256"
        )
        self.layers = self.root / "image" / "overlay2" / "layerdb" / "sha256"

    @classmethod
    def of(cls, client, image_id: str) -> "LayerStore | None":
        """The store of the engine behind `client`, when this process can read it."""
        try:
            if client.api.base_url != "http+docker://localhost":
                return None  # not this machine's unix socket
            info = client.info()
        except docker.errors.DockerException:
            return None
        if info.get("Driver") != "overlay2":
            return None
        store = cls(info.get("DockerRootDir", "/var/lib/docker"))
        config = store.images / image_id.removeprefix("sha256:")
        return store if os.access(config, os.R_OK) else None

    def config(self, image_id: str) -> bytes:
        data = (self.images / image_id.removeprefix("sha256:")).read_bytes()
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != image_id:
            raise LayerMismatch(f"the stored config of {image_id} does not match it")
        return data

    def _entries(self, chain: str) -> Iterator[tuple[bytes | None, str, int]]:
        """(segment bytes, None, 0) or (None, file name, size) in tar order."""
        record = self.layers / chain.removeprefix("sha256:") / "tar-split.json.gz"
        with gzip.open(record, "rt") as lines:
            for line in lines:
                entry = json.loads(line)
                if entry["type"] == 2:
                    yield base64.b64decode(entry["payload"]), "", 0
                elif entry.get("size"):
                    name = entry.get("name")
                    if name is None:
                        raw = base64.b64decode(entry["name_raw"])
                        name = raw.decode("utf-8", "surrogateescape")
                    yield None, name, int(entry["size"])

    def tar_size(self, chain: str) -> int:
        return sum(
            len(seg) if seg is not None else size
            for seg, _, size in self._entries(chain)
        )

    def layer_chunks(self, chain: str, diff_id: str) -> Iterator[bytes]:
        layer = self.layers / chain.removeprefix("sha256:")
        cache_id = (layer / "cache-id").read_text().strip()
        files = (self.root / "overlay2" / cache_id / "diff").resolve()
        digest = hashlib.sha256()
        for segment, name, size in self._entries(chain):
            if segment is not None:
                digest.update(segment)
                yield segment
                continue
            path = (files / name).resolve()
            if not path.is_relative_to(files):
                raise LayerMismatch(f"layer {diff_id} names a file outside it: {name}")
            with open(path, "rb") as handle:
                left = size
                while left:
                    data = handle.read(min(left, CHUNK))
                    if not data:
                        raise LayerMismatch(
                            f"{name} of layer {diff_id} is shorter than recorded"
                        )
                    digest.update(data)
                    left -= len(data)
                    yield data
        if f"sha256:{digest.hexdigest()}" != diff_id:
            raise LayerMismatch(
                f"layer {diff_id} rebuilt from the store does not match it"
            )


def _store_archive(
    store: LayerStore, src: SourceImage, send: Sequence[bool]
) -> tuple[int, Iterator[bytes]]:
    """(size, chunks) of a docker-save archive holding only the layers in `send`."""
    config = store.config(src.image_id)
    config_name = f"{src.image_id.removeprefix('sha256:')}.json"
    layer_names = [f"{diff.removeprefix('sha256:')}/layer.tar" for diff in src.diff_ids]
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": src.tags, "Layers": layer_names}]
    ).encode()

    layers: dict[str, tuple[str, str, int]] = {}
    for index, (diff, chain) in enumerate(zip(src.diff_ids, src.chains, strict=True)):
        if send[index] and layer_names[index] not in layers:
            layers[layer_names[index]] = (chain, diff, store.tar_size(chain))
    total = sum(BLOCK + len(d) + _pad(len(d)) for d in (manifest, config)) + 2 * BLOCK
    total += sum(BLOCK + size + _pad(size) for _, _, size in layers.values())

    def chunks() -> Iterator[bytes]:
        for name, data in (("manifest.json", manifest), (config_name, config)):
            yield _tar_header(name, len(data)) + data + b"\0" * _pad(len(data))
        for name, (chain, diff, size) in layers.items():
            yield _tar_header(name, size)
            yield from store.layer_chunks(chain, diff)
            yield b"\0" * _pad(size)
        yield b"\0" * (2 * BLOCK)

    return total, chunks()


class _Reader:
    """Exact-size reads over an iterator of byte chunks."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._buffer = b""
        self._offset = 0

    def read(self, size: int) -> bytes:
        """`size` bytes, fewer only at the end of the stream."""
        parts, have = [], 0
        while have < size:
            if self._offset == len(self._buffer):
                self._buffer, self._offset = next(self._chunks, b""), 0
                if not self._buffer:
                    break
            piece = self._buffer[self._offset : self._offset + size - have]
            self._offset += len(piece)
            parts.append(piece)
            have += len(piece)
        return b"".join(parts)

    def pieces(self, size: int) -> Iterator[bytes]:
        left = size
        while left:
            piece = self.read(min(left, CHUNK))
            if not piece:
                raise EngineError(
                    "the docker save stream ended in the middle of a file"
                )
            left -= len(piece)
            yield piece


def _go_json(value) -> str:
    """JSON the way Go's encoding/json writes it (compact, HTML-safe escapes)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # Scan escape pairs so that an escaped backslash before b or f stays as is.
    short = {"b": "\\u0008", "f": "\\u000c"}
    text = re.sub(r"\\(.)", lambda m: short.get(m[1], m[0]), text)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def v1_layer_position(v1_id: str, v1_json: bytes, chains: Sequence[str]) -> int | None:
    """Which layer a legacy `docker save` directory holds, from its `json` file.

    The directory is named by docker's v1 ID, a digest of that JSON (without
    "id"; "os" only on the top layer) plus the layer's chain ID and the parent's
    v1 ID. Trying each chain ID gives the position; None when nothing matches
    (the layer is then sent, which is always safe).
    """
    try:
        data = json.loads(v1_json)
    except ValueError:
        return None
    parent = data.get("parent")
    for with_os in (False, True):
        fields = {
            key: _go_json(value)
            for key, value in data.items()
            if key != "id" and (with_os or key != "os")
        }
        if parent:
            fields["parent"] = _go_json(
                parent if parent.startswith("sha256:") else f"sha256:{parent}"
            )
        for position, chain in enumerate(chains):
            fields["layer_id"] = _go_json(chain)
            text = (
                "{"
                + ",".join(f"{_go_json(k)}:{fields[k]}" for k in sorted(fields))
                + "}"
            )
            if hashlib.sha256(text.encode()).hexdigest() == v1_id:
                return position
    return None


def filter_save_stream(
    chunks: Iterable[bytes], src: SourceImage, send: Sequence[bool], stats: dict
) -> Iterator[bytes]:
    """Pass a `docker save` tar stream through, leaving out layers not in `send`.

    Understands the legacy layout (<v1 id>/layer.tar, engines before 25) and the
    OCI one (blobs/sha256/<diff id> for uncompressed layers). Every other member
    passes unchanged; a layer that cannot be identified is kept.
    `stats["skipped"]` counts the layers left out.
    """
    reader = _Reader(chunks)
    chains = src.chains
    positions_of: dict[str, list[int]] = {}
    for index, diff in enumerate(src.diff_ids):
        positions_of.setdefault(diff.removeprefix("sha256:"), []).append(index)
    v1_position: dict[str, int] = {}
    stats["skipped"] = 0
    pending: list[bytes] = []
    long_name = None
    while True:
        header = reader.read(BLOCK)
        if len(header) < BLOCK:
            raise EngineError(
                "the docker save stream ended before the end of its archive"
            )
        if header == b"\0" * BLOCK:
            yield header
            while rest := reader.read(CHUNK):
                yield rest
            return
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        padded = info.size + _pad(info.size)
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE):
            data = reader.read(padded)
            pending.append(header + data)
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = (
                    data[: info.size].rstrip(b"\0").decode(errors="surrogateescape")
                )
            elif info.type == tarfile.XHDTYPE:
                found = re.search(rb"\d+ path=([^\n]*)\n", data[: info.size])
                long_name = (
                    found[1].decode(errors="surrogateescape") if found else long_name
                )
            continue
        name = (long_name or info.name).removeprefix("./")
        long_name = None

        keep = True
        if name.endswith("/layer.tar") and name.count("/") == 1:
            position = v1_position.get(name.split("/")[0])
            keep = position is None or send[position]
        elif name.startswith("blobs/sha256/"):
            positions = positions_of.get(name.rsplit("/", 1)[-1], [])
            keep = not positions or any(send[p] for p in positions)

        if not keep:
            for _ in reader.pieces(padded):
                pass
            pending.clear()
            stats["skipped"] += 1
            continue

        yield b"".join(pending) + header
        pending.clear()
        if name.endswith("/json") and name.count("/") == 1 and info.size < (1 << 20):
            data = reader.read(padded)
            v1_id = name.split("/")[0]
            position = v1_layer_position(v1_id, data[: info.size], chains)
            if position is not None:
                v1_position[v1_id] = position
            yield data
        else:
            yield from reader.pieces(padded)


# --- the data path -----------------------------------------------------------


@dataclass
class _Sent:
    raw: int = 0
    compressed: int = 0


class _SourceFailed(Exception):
    """Reading the image on this machine failed (the original is the cause)."""


def _pump(
    chunks: Iterator[bytes],
    stream: LoadStream,
    *,
    level: int,
    bar,
    on_chunk: Callable[[int], None] | None,
    sent: _Sent,
) -> Outcome:
    """gzip `chunks` into `stream` (compression in a thread of its own)."""
    done = object()
    pipe: queue.Queue = queue.Queue(maxsize=16)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                pipe.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            compressor = gzip_compressor(level)
            buffer, held, raw = [], 0, 0
            for chunk in chunks:
                raw += len(chunk)
                if out := compressor.compress(chunk):
                    buffer.append(out)
                    held += len(out)
                if held >= (256 << 10):
                    if not put((b"".join(buffer), raw)):
                        return
                    buffer, held, raw = [], 0, 0
            buffer.append(compressor.flush())
            if put((b"".join(buffer), raw)):
                put(done)
        except BaseException as error:  # handed to the sending thread
            put(_SourceFailed(error))
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()

    producer = threading.Thread(target=produce, name="fbm-image-gzip", daemon=True)
    producer.start()
    try:
        while True:
            item = pipe.get()
            if item is done:
                break
            if isinstance(item, _SourceFailed):
                raise item
            data, raw = item
            stream.write(data)
            sent.raw += raw
            sent.compressed += len(data)
            bar.update(raw)
            if on_chunk:
                on_chunk(sent.compressed)
    except BaseException:
        stop.set()
        stream.abort()
        raise
    finally:
        stop.set()
        producer.join()
    return stream.finish()


# --- streaming transfer ------------------------------------------------------


@dataclass
class TransferResult:
    """What a transfer did; `summary()` is the status line."""

    image: str
    image_id: str
    target: str
    mode: str  # skipped | tagged | partial | full
    source: str | None = None  # store | save
    tags: list[str] = field(default_factory=list)
    layers_total: int = 0
    layers_sent: int = 0
    raw_bytes: int = 0
    sent_bytes: int = 0
    seconds: float = 0.0
    fallback: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        short = self.image_id.removeprefix("sha256:")[:12]
        head = f"{self.image} -> {self.target}:"
        if self.mode == "skipped":
            return f"{head} already there (image {short}); nothing sent"
        if self.mode == "tagged":
            return f"{head} image {short} was there; tagged {', '.join(self.tags)}"
        layers = f"{self.layers_sent} of {self.layers_total} layers"
        line = (
            f"{head} sent {layers}, {human(self.sent_bytes)} compressed "
            f"({human(self.raw_bytes)} raw) in {self.seconds:.1f} s; "
            f"image {short} loaded and checked"
        )
        if self.fallback:
            line += f" (full image: {self.fallback})"
        return line


def transfer_image(
    image: str,
    target,
    *,
    tags: Sequence[str] | None = None,
    source: str = "auto",
    compresslevel: int = 1,
    check_disk: bool = True,
    progress: bool | None = None,
    status: Callable[[str], None] | None = _stderr_line,
    on_chunk: Callable[[int], None] | None = None,
    docker_host: str | None = None,
) -> TransferResult:
    """Stream `image` from this machine's engine into the target's engine.

    `target`: a LocalTarget, SshTarget, Fabric Connection or host object (see
    `as_target`). `tags` default to the reference given (with :latest added).
    `source`: "auto" (the local layer store when readable, else docker save),
    "store" or "save". `compresslevel`: gzip level of the stream (1 is the fast
    end). `progress`: a bar on stderr (default: when stderr is a terminal).
    `status`: receives the final status line (and fallback notices).
    `on_chunk(compressed_bytes_so_far)` is called after each piece sent.
    `docker_host` selects the source engine (default: DOCKER_HOST or the socket).
    """
    if source not in ("auto", "store", "save"):
        raise BadInput(f"unknown image source {source!r}; use auto, store or save")
    client = _source_client(docker_host)
    try:
        job = _Streaming(
            client,
            as_target(target),
            _inspect_source(client, image, tags),
            level=compresslevel,
            check_disk=check_disk,
            progress=progress,
            on_chunk=on_chunk,
            say=status or (lambda _line: None),
        )
        return job.run(source)
    finally:
        client.close()


class _Streaming:
    """One streaming transfer: decide, send (once or twice), check."""

    def __init__(self, client, target, src: SourceImage, **options):
        self.client = client
        self.target = target
        self.src = src
        self.options = options
        self.say = options["say"]
        self.result = TransferResult(
            src.ref, src.image_id, target.name, "full", tags=src.tags
        )
        self.result.layers_total = len(src.diff_ids)

    def run(self, source: str) -> TransferResult:
        started = time.monotonic()
        target, src, result = self.target, self.src, self.result
        self.root = _docker_root(target)
        if self._already_there():
            result.seconds = time.monotonic() - started
            self.say(result.summary())
            return result

        present = target_chains(target)
        send = [chain not in present for chain in src.chains]
        store = None if source == "save" else LayerStore.of(self.client, src.image_id)
        if source == "store" and store is None:
            raise StateError(
                "the local layer store cannot be read (needs this machine's overlay2 "
                "engine, and root); use source='save'"
            )

        plans = [send] if all(send) else [send, [True] * len(send)]
        for plan in plans:
            try:
                outcome = self._send(plan, store)
            except LayerMismatch as error:
                # The store did not give the bytes docker expects: use docker save.
                self.say(f"reading the layer store failed ({error}); using docker save")
                store = None
                outcome = self._send(plan, store)
            problem = _check_loaded(target, src, outcome)
            if problem is None:
                break
            if plan is plans[-1]:
                raise EngineError(
                    f"loading {src.ref} on {target.name} failed: {problem}; "
                    "check the engine there (docker info, df) and retry"
                )
            result.fallback = f"the target refused the partial archive ({problem})"
            self.say(f"{target.name}: {result.fallback}; sending the full image")
        result.seconds = time.monotonic() - started
        self.say(result.summary())
        return result

    def _already_there(self) -> bool:
        """True when nothing needs sending: same image (tagging it if needed)."""
        target, src = self.target, self.src
        found = [target_image_id(target, tag) for tag in src.tags]
        if target_image_id(target, src.image_id) != src.image_id:
            return False
        if all(found_id == src.image_id for found_id in found):
            self.result.mode = "skipped"
            return True
        for tag in src.tags:
            target.run(target.docker("tag", src.image_id, tag))
        self.result.mode = "tagged"
        return True

    def _send(self, send: list[bool], store: "LayerStore | None") -> Outcome:
        """Build the archive for plan `send`, check the space, stream it once."""
        src, target, result = self.src, self.target, self.result
        if store is not None:
            try:
                total, chunks = _store_archive(store, src, send)
            except (OSError, ValueError, KeyError) as error:
                raise LayerMismatch(
                    f"the layer store is not as expected: {error}"
                ) from error
            result.source = "store"
        else:
            # Layer sizes are unknown before the stream: the full image bounds
            # the disk needed, and the bar has no end when layers are left out.
            total, stats = src.size, {"skipped": 0}
            ref = src.tags[0] if src.tags else src.image_id
            try:
                saved = self.client.api.get_image(ref, chunk_size=CHUNK)
            except docker.errors.APIError as error:
                raise EngineError(f"docker save {ref}: {error.explanation}") from error
            chunks = filter_save_stream(saved, src, send, stats)
            result.source = "save"
        if self.options["check_disk"]:
            check_space(target, self.root, 2 * total, f"loading {src.ref}")

        result.mode = "full" if all(send) else "partial"
        result.layers_sent = sum(send)
        sent = _Sent()
        progress = self.options["progress"]
        bar = tqdm(
            total=total if store is not None or all(send) else None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            desc=f"{src.ref} -> {target.name}",
            disable=not (sys.stderr.isatty() if progress is None else progress),
            leave=False,
        )
        stream = target.open_stream(target.docker("load"))
        try:
            outcome = _pump(
                chunks,
                stream,
                level=self.options["level"],
                bar=bar,
                on_chunk=self.options["on_chunk"],
                sent=sent,
            )
            if store is None:
                result.layers_sent = len(src.diff_ids) - stats["skipped"]
        except LoadEndedEarly as early:
            outcome = early.outcome
        except _SourceFailed as failure:
            cause = failure.args[0]
            if isinstance(cause, (LayerMismatch, FbmVpnError)):
                raise cause from None
            if store is not None and isinstance(cause, (OSError, ValueError, KeyError)):
                raise LayerMismatch(f"reading the layer store: {cause}") from cause
            raise EngineError(
                f"reading {src.ref} from this machine's engine failed: {cause}; "
                f"nothing was loaded on {target.name}; check the image here "
                "(docker image inspect) and retry"
            ) from cause
        except Interrupted as error:
            outcome = self._after_interruption(sent, str(error))
        finally:
            bar.close()
            result.raw_bytes, result.sent_bytes = sent.raw, sent.compressed
        return outcome

    def _after_interruption(self, sent: "_Sent", why: str) -> Outcome:
        """Check and clean the target after a broken data path, then raise.

        docker load reads the whole archive before it registers anything, and
        a cut gzip stream makes it fail: a cut transfer leaves no image. An ID
        present but untagged would be a leftover and is removed. When the cut
        came after the end of the data and the image is complete, it counts.
        """
        target, src = self.target, self.src
        head = (
            f"the transfer of {src.ref} to {target.name} was interrupted after "
            f"{human(sent.compressed)} sent: {why}"
        )
        try:
            target.reconnect()
            if target_image_id(target, src.image_id) is None:
                state = "the target holds no partial image of it"
            elif all(target_image_id(target, t) == src.image_id for t in src.tags):
                self.result.notes.append(f"{head}, but the image arrived complete")
                return Outcome(True, "", "", 0)
            else:
                target.probe(target.docker("image", "rm", src.image_id))
                state = "the incomplete copy left there was removed"
        except FbmVpnError as error:
            state = (
                f"could not check the target afterwards ({error}); look there for "
                "a dangling image (docker image ls -f dangling=true)"
            )
        raise EngineError(f"{head}; {state}; run the transfer again")


def _check_loaded(target, src: SourceImage, outcome: Outcome) -> str | None:
    """None when the target holds the image under every tag, else what is wrong."""
    if not outcome.ok:
        said = (outcome.stderr or outcome.stdout or "").strip()[-300:]
        return said or f"docker load exited {outcome.exited}"
    if target_image_id(target, src.image_id) != src.image_id:
        return f"image {src.image_id} is not on the target after docker load"
    for tag in src.tags:
        if target_image_id(target, tag) != src.image_id:
            target.run(target.docker("tag", src.image_id, tag))
            if target_image_id(target, tag) != src.image_id:
                return f"tag {tag} does not point to {src.image_id}"
    return None


# --- via files (the manual's artifacts) --------------------------------------


def node_run_files(compose_file: Path, run_mounts: Path) -> dict[str, Path]:
    """The manual's node bundle: the node-only compose file and node/run_mounts."""
    return {NODE_COMPOSE_NAME: Path(compose_file), "node/run_mounts": Path(run_mounts)}


@dataclass
class FileBundle:
    """The manual's files for one image, and what shipping them took."""

    image: str
    image_id: str
    image_file: Path
    files_file: Path | None
    image_bytes: int = 0
    files_bytes: int = 0
    raw_bytes: int = 0
    excluded: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    target: str | None = None
    base_dir: str | None = None

    @property
    def sent_bytes(self) -> int:
        return self.image_bytes + self.files_bytes

    def summary(self) -> str:
        files = [f"{self.image_file.name} {human(self.image_bytes)}"]
        if self.files_file:
            files.append(f"{self.files_file.name} {human(self.files_bytes)}")
        line = f"{self.image}: {', '.join(files)}"
        if self.target:
            line += f"; loaded on {self.target}, unpacked in {self.base_dir}"
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
        return f"{line} ({steps})"


def _write_gzip(path: Path, chunks: Iterable[bytes], level: int) -> int:
    """Write chunks gzip-compressed to `path` atomically; raw bytes written."""
    tmp = path.with_name(f".{path.name}.part")
    compressor = gzip_compressor(level)
    raw = 0
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                out.write(compressor.compress(chunk))
                raw += len(chunk)
            out.write(compressor.flush())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return raw


def pack_run_files(
    run_files: Mapping[str, Path], out: Path, *, level: int = 6
) -> list[str]:
    """Tar+gzip `run_files` (archive name -> path) into `out`, as the manual does.

    Any wg0.conf or config.env is left out (they hold this machine's VPN keys
    and peer settings); the names left out are returned.
    """
    excluded: list[str] = []

    def keep(info: tarfile.TarInfo):
        if Path(info.name).name in EXCLUDED_RUN_FILES:
            excluded.append(info.name.removeprefix("./"))
            return None
        return info

    tmp = out.with_name(f".{out.name}.part")
    try:
        with tarfile.open(tmp, "w:gz", compresslevel=level) as tar:
            for arcname, path in run_files.items():
                path = Path(path)
                if not path.exists():
                    raise BadInput(f"run file {path} does not exist; generate it first")
                tar.add(path, arcname=f"./{arcname}", filter=keep)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return excluded


def save_bundle(
    image: str,
    out_dir: Path,
    *,
    run_files: Mapping[str, Path] | None = None,
    name: str | None = None,
    compresslevel: int = 6,
    docker_host: str | None = None,
    status: Callable[[str], None] | None = _stderr_line,
) -> FileBundle:
    """Write the manual's files for `image` into `out_dir`.

    NAME-image.tar.gz is `docker image save IMAGE | gzip`; NAME-files.tar.gz
    holds `run_files` (archive name -> path, see `node_run_files`) without key
    material. NAME defaults to the repository's last part (vpn-node).
    """
    say = status or (lambda _line: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or bundle_name(image)
    client = _source_client(docker_host)
    try:
        src = _inspect_source(client, image, None)
        bundle = FileBundle(image, src.image_id, out_dir / f"{name}-image.tar.gz", None)
        started = time.monotonic()
        try:
            saved = client.api.get_image(image, chunk_size=CHUNK)
            bundle.raw_bytes = _write_gzip(bundle.image_file, saved, compresslevel)
        except docker.errors.APIError as error:
            raise EngineError(f"docker save {image}: {error.explanation}") from error
        bundle.image_bytes = bundle.image_file.stat().st_size
        bundle.timings["save"] = time.monotonic() - started
    finally:
        client.close()

    if run_files:
        started = time.monotonic()
        bundle.files_file = out_dir / f"{name}-files.tar.gz"
        bundle.excluded = pack_run_files(run_files, bundle.files_file)
        bundle.files_bytes = bundle.files_file.stat().st_size
        bundle.timings["pack"] = time.monotonic() - started
        if bundle.excluded:
            say(
                f"left out of {bundle.files_file.name} (VPN keys and peer settings "
                f"of this machine): {', '.join(bundle.excluded)}"
            )
    return bundle


def ship_via_files(
    image: str,
    target,
    *,
    out_dir: Path,
    base_dir: str,
    run_files: Mapping[str, Path] | None = None,
    remote_dir: str = "/tmp",
    name: str | None = None,
    keep_remote: bool = False,
    check_disk: bool = True,
    docker_host: str | None = None,
    status: Callable[[str], None] | None = _stderr_line,
) -> FileBundle:
    """The manual's sequence: save the files, copy them, load and unpack there.

    The files stay in `out_dir`; on the target they go to `remote_dir`, the
    image is loaded (`docker image load -i`), the run files are unpacked in
    `base_dir` with docker-compose_run_node.yml renamed docker-compose.yml, and
    the copies in `remote_dir` are removed unless `keep_remote`.
    """
    target = as_target(target)
    say = status or (lambda _line: None)
    bundle = save_bundle(
        image,
        out_dir,
        run_files=run_files,
        name=name,
        docker_host=docker_host,
        status=status,
    )
    bundle.target, bundle.base_dir = target.name, base_dir
    root = _docker_root(target)
    target.run(["mkdir", "-p", remote_dir, base_dir])
    if check_disk:
        check_space(target, remote_dir, bundle.sent_bytes, "the copied files")
        check_space(target, root, 2 * bundle.raw_bytes, f"loading {image}")

    started = time.monotonic()
    remote_image = f"{remote_dir.rstrip('/')}/{bundle.image_file.name}"
    target.put(bundle.image_file, remote_image)
    remote_files = None
    if bundle.files_file:
        remote_files = f"{remote_dir.rstrip('/')}/{bundle.files_file.name}"
        target.put(bundle.files_file, remote_files)
    bundle.timings["copy"] = time.monotonic() - started

    started = time.monotonic()
    target.run(target.docker("image", "load", "-i", remote_image))
    if target_image_id(target, bundle.image_id) != bundle.image_id:
        raise EngineError(
            f"{image} is not on {target.name} after docker image load; "
            f"check {remote_image} there and retry"
        )
    bundle.timings["load"] = time.monotonic() - started

    if remote_files:
        started = time.monotonic()
        target.run(["tar", "xzf", remote_files, "-C", base_dir])
        if run_files and NODE_COMPOSE_NAME in run_files:
            base = base_dir.rstrip("/")
            target.run(
                ["mv", "-f", f"{base}/{NODE_COMPOSE_NAME}", f"{base}/{COMPOSE_NAME}"]
            )
        bundle.timings["unpack"] = time.monotonic() - started
    if not keep_remote:
        target.run(
            ["rm", "-f", remote_image, *([remote_files] if remote_files else [])]
        )
    say(bundle.summary())
    return bundle
