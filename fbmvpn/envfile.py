"""Read and write the `KEY=value` config.env files shared with the containers."""

import re
from pathlib import Path

from .errors import BadInput, StateError

_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def parse(text: str, source: str = "config.env") -> dict[str, str]:
    """Parse `KEY=value` lines; blank lines and `#` comments are ignored."""
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            # The line is not echoed: it may hold a key.
            raise StateError(f"{source}, line {number} is not of the form KEY=value")
        key, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def load(path: Path, required: tuple[str, ...] = ()) -> dict[str, str]:
    """Parse an env file and check it holds every required key with a value."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"{path} does not exist")
    values = parse(path.read_text(), str(path))
    missing = [key for key in required if not values.get(key)]
    if missing:
        raise StateError(f"{path} is incomplete: {', '.join(missing)} missing or empty")
    return values


def render(values: dict[str, str]) -> str:
    """Render a mapping as `KEY=value` lines."""
    lines = []
    for key, value in values.items():
        value = str(value)
        if "\n" in value or "\r" in value:
            raise BadInput(f"value of {key} spans several lines")
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"
