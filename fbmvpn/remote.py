"""A remote machine reached over SSH with a Fabric Connection.

Same interface as `host.LocalHost`, so the stack logic drives a remote host
exactly as it drives this one. Files go through SFTP: a temporary name in the
target folder, the mode set, then a rename, so a reader never sees a part.
"""

import io
import posixpath
import secrets
import shlex
import socket
from pathlib import PurePosixPath

import paramiko

from .errors import EngineError
from .host import Outcome


def connect_error(host: str, error: Exception) -> EngineError:
    """A connection failure as a sentence that says what to check."""
    if isinstance(error, paramiko.BadHostKeyException):
        return EngineError(
            f"the SSH host key of {host} changed since it was recorded in "
            f"known_hosts; if the machine was reinstalled, remove the old key "
            f"(`ssh-keygen -R {host}`), otherwise do not connect"
        )
    if isinstance(error, paramiko.SSHException) and "not found in known_hosts" in str(
        error
    ):
        return EngineError(
            f"{host} is not in known_hosts; check its key fingerprint and add it "
            f"(`ssh-keyscan {host} >> ~/.ssh/known_hosts`), or pass --accept-new-host"
        )
    if isinstance(error, paramiko.AuthenticationException):
        return EngineError(
            f"SSH authentication to {host} failed; check the user and key "
            f"(`ssh {host}` must work without a password prompt)"
        )
    unreachable = (
        paramiko.ssh_exception.NoValidConnectionsError,
        ConnectionRefusedError,
        socket.timeout,
        socket.gaierror,
    )
    if isinstance(error, unreachable):
        return EngineError(
            f"cannot reach {host} over SSH ({error}); check the host name, the "
            f"port and that sshd runs there"
        )
    return EngineError(f"SSH to {host} failed: {error}")


class RemoteHost:
    """Runs commands and moves files on one machine through a Fabric Connection."""

    def __init__(self, conn):
        self.conn = conn
        self.name = conn.host if conn.port == 22 else f"{conn.host}:{conn.port}"
        self._home = None

    @property
    def dry(self) -> bool:
        return bool(self.conn.config.run.get("dry", False))

    def open(self) -> None:
        try:
            self.conn.open()
        except Exception as error:  # paramiko and socket raise many kinds
            raise connect_error(self.name, error) from None

    def run(self, argv, *, hide=False, warn=False, echo=None, stdin=None) -> Outcome:
        command = shlex.join(str(arg) for arg in argv)
        if stdin is not None:
            return self._run_with_input(command, stdin, hide, warn)
        kwargs = {"hide": hide, "warn": warn, "in_stream": False}
        if echo is not None:
            kwargs["echo"] = echo
        self.open()
        result = self.conn.run(command, **kwargs)
        if self.dry:
            return Outcome(True, None, "", 0)
        return Outcome(result.ok, result.stdout, result.stderr, result.exited)

    def _run_with_input(self, command, text, hide, warn) -> Outcome:
        if self.conn.config.run.get("echo"):
            print(f"[{self.name}] {command} < (input)", flush=True)
        if self.dry:
            return Outcome(True, None, "", 0)
        self.open()
        channel = self.conn.client.get_transport().open_session()
        try:
            channel.exec_command(command)
            channel.sendall(text.encode())
            channel.shutdown_write()
            out = channel.makefile("rb").read().decode()
            err = channel.makefile_stderr("rb").read().decode()
            code = channel.recv_exit_status()
        finally:
            channel.close()
        if hide not in (True, "both", "stdout", "out"):
            print(out, end="", flush=True)
        if code and not warn:
            raise EngineError(f"`{command}` failed on {self.name} (exit {code}): {err}")
        return Outcome(code == 0, out, err, code)

    def probe(self, argv) -> Outcome:
        self.open()
        command = shlex.join(str(arg) for arg in argv)
        result = self.conn.run(
            command, hide=True, warn=True, in_stream=False, dry=False, echo=False
        )
        return Outcome(result.ok, result.stdout, result.stderr, result.exited)

    def home(self) -> PurePosixPath:
        if self._home is None:
            self._home = PurePosixPath(
                self.probe(["sh", "-c", "echo $HOME"]).stdout.strip()
            )
        return self._home

    def exists(self, path) -> bool:
        return self.probe(["test", "-e", str(path)]).ok

    def read_text(self, path) -> str:
        result = self.probe(["cat", str(path)])
        if not result.ok:
            raise EngineError(f"cannot read {path} on {self.name}: {result.stderr}")
        return result.stdout

    def write_text(self, path, text: str, mode: int = 0o600) -> bool:
        path = str(path)
        if self.exists(path) and self.read_text(path) == text:
            return False
        if self.dry:
            print(f"(dry run) would write {self.name}:{path}")
            return True
        self.mkdir(posixpath.dirname(path))
        name = f".{posixpath.basename(path)}.{secrets.token_hex(4)}.part"
        temporary = posixpath.join(posixpath.dirname(path), name)
        sftp = self.conn.sftp()
        sftp.putfo(io.BytesIO(text.encode()), temporary)
        sftp.chmod(temporary, mode)
        sftp.posix_rename(temporary, path)
        return True

    def mkdir(self, path) -> None:
        if not self.dry:
            self.probe(["mkdir", "-p", str(path)])

    def remove_tree(self, path) -> None:
        if self.dry:
            print(f"(dry run) would delete {self.name}:{path}")
        else:
            self.run(["rm", "-rf", str(path)], hide=True)
