"""Where commands run and files live: this machine, through an Invoke context.

The stack logic talks to a host object, never to Invoke or Fabric directly, so
the same code drives this machine (`LocalHost`) and remote ones over SSH.
Commands are given as argument lists and quoted here, once.
"""

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError
from .files import write_atomic


@dataclass
class Outcome:
    """What a command gave back (`None` output when it did not run: dry run)."""

    ok: bool
    stdout: str | None
    stderr: str
    exited: int


class LocalHost:
    """Runs commands with an Invoke Context and touches files on this machine."""

    name = "local"

    def __init__(self, ctx):
        self.ctx = ctx

    @property
    def dry(self) -> bool:
        return bool(self.ctx.config.run.get("dry", False))

    def run(self, argv, *, hide=False, warn=False, echo=None, stdin=None) -> Outcome:
        """Run a command; `hide=True` makes it a silent probe.

        `stdin` text is fed through a pipe in one piece (Invoke's own stdin
        forwarding reads a character at a time, far too slow for bulk input).
        """
        command = shlex.join(str(arg) for arg in argv)
        if stdin is not None:
            return self._run_with_input(command, argv, stdin, hide, warn, echo)
        kwargs = {"hide": hide, "warn": warn, "in_stream": False}
        if echo is not None:
            kwargs["echo"] = echo
        result = self.ctx.run(command, **kwargs)
        if self.dry:
            return Outcome(True, None, "", 0)
        return Outcome(result.ok, result.stdout, result.stderr, result.exited)

    def _run_with_input(self, command, argv, text, hide, warn, echo) -> Outcome:
        if echo if echo is not None else self.ctx.config.run.echo:
            print(f"{command} < (input)", flush=True)
        if self.dry:
            return Outcome(True, None, "", 0)
        done = subprocess.run(
            [str(arg) for arg in argv], input=text, capture_output=True, text=True
        )
        if hide not in (True, "both", "stdout", "out"):
            sys.stdout.write(done.stdout)
        if hide not in (True, "both", "stderr", "err"):
            sys.stderr.write(done.stderr)
        if done.returncode and not warn:
            raise EngineError(
                f"`{command}` failed (exit {done.returncode}): "
                f"{done.stderr.strip()[-300:]}"
            )
        return Outcome(done.returncode == 0, done.stdout, done.stderr, done.returncode)

    def probe(self, argv) -> Outcome:
        """Run a read-only command even in a dry run, without echo."""
        command = shlex.join(str(arg) for arg in argv)
        runner = self.ctx.config.runners.local(self.ctx)
        result = runner.run(command, hide=True, warn=True, in_stream=False, dry=False)
        return Outcome(result.ok, result.stdout, result.stderr, result.exited)

    def exists(self, path: Path) -> bool:
        return Path(path).exists()

    def read_text(self, path: Path) -> str:
        return Path(path).read_text()

    def write_text(self, path: Path, text: str, mode: int = 0o600) -> bool:
        """Write a file atomically if its content differs; True when written."""
        path = Path(path)
        if path.exists() and path.read_text() == text:
            return False
        if self.dry:
            print(f"(dry run) would write {path}")
            return True
        write_atomic(path, text, mode)
        return True

    def mkdir(self, path: Path) -> None:
        if not self.dry:
            Path(path).mkdir(parents=True, exist_ok=True)

    def remove_tree(self, path: Path) -> None:
        path = Path(path)
        if self.dry:
            print(f"(dry run) would delete {path}")
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
