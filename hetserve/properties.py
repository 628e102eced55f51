"""TorchServe's ``config.properties``, read and rewritten in one place.

Reading is the worker's own parser (``handlers.frontend_limits.parse_properties``: Java's
Properties rules, which the frontend applies), so the CLI, the tuner and the worker agree on what
a file says. Rewriting keeps every other line (comments included) as it was, so a derived file
diffs against the shipped one line by line: a ``#`` line is a comment, the first ``=`` splits a
live line's key from its value.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from handlers.frontend_limits import parse_properties

__all__ = ["merge_properties", "parse_properties", "read_properties"]


def _live_key(line: str) -> str | None:
    """The key a line sets; None for a comment or a line without ``=``."""
    if "=" not in line or line.lstrip().startswith("#"):
        return None
    return line.split("=", 1)[0].strip()


def read_properties(path: Path) -> dict[str, str]:
    return parse_properties(Path(path).read_text())


def merge_properties(text: str, overrides: Mapping[str, str]) -> str:
    """``text`` with each overridden key's live line replaced in place; keys it lacks appended."""
    lines, seen = [], set()
    for line in text.splitlines():
        key = _live_key(line)
        if key is not None and key in overrides:
            lines.append(f"{key}={overrides[key]}")
            seen.add(key)
        else:
            lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items() if k not in seen]
    return "\n".join(lines) + "\n"
