"""Where commands run and files live: this machine, through an Invoke context.

The stack logic talks to a host object, never to Invoke or Fabric directly, so
the same code drives this machine (`LocalHost`) and remote ones over SSH.
Commands are given as argument lists and quoted here, once.
"""

import io
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

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
        """Run a command; `hide=True` makes it a silent probe."""
        command = shlex.join(str(arg) for arg in argv)
        kwargs = {"hide": hide, "warn": warn, "in_stream": False}
        if echo is not None:
            kwargs["echo"] = echo
        if stdin is not None:
            kwargs["in_stream"] = io.StringIO(stdin)
        result = self.ctx.run(command, **kwargs)
        if self.dry:
            return Outcome(True, None, "", 0)
        return Outcome(result.ok, result.stdout, result.stderr, result.exited)

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
