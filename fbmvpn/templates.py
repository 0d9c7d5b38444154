"""Render the project's Jinja2 templates (the top-level `templates/` folder)."""

from functools import cache
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


@cache
def environment():
    import jinja2  # here, not at module level: read-only tools start faster

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render(name: str, **values) -> str:
    """Render `templates/<name>` with `values`; a missing value is an error."""
    return environment().get_template(name).render(**values)
