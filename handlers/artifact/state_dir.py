"""Where a worker may keep its performance history (issue 17, item 2).

``hetserve.state_dir`` comes from the archive's model-config.yaml, which whoever built the archive
wrote; TorchServe's workers often run as root and their working directory is the unpacked model
directory. So the directory is expanded (``~``), must be absolute, must not lie inside the model
directory (a file there makes every later worker start refuse the model as tampered), and must lie
under a root the operator allowed: the user cache (``$XDG_CACHE_HOME`` or ``~/.cache``), the
operator's ``HETSERVE_STATE_DIR``, or one of the ``HETSERVE_STATE_ROOTS`` (os.pathsep-separated).
Anything else is a load error that names the knob, the path and the rule.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

STATE_DIR_ENV = "HETSERVE_STATE_DIR"
STATE_ROOTS_ENV = "HETSERVE_STATE_ROOTS"


class StateDirError(ValueError):
    """``hetserve.state_dir`` (or ``HETSERVE_STATE_DIR``) names a directory a worker must not use."""


def user_cache_root(env: Mapping[str, str], home: Path) -> Path:
    xdg = env.get("XDG_CACHE_HOME", "")
    return Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".cache"


def allowed_roots(env: Mapping[str, str], home: Path) -> list[Path]:
    roots = [user_cache_root(env, home)]
    for entry in (env.get(STATE_DIR_ENV, ""), *env.get(STATE_ROOTS_ENV, "").split(os.pathsep)):
        if entry and Path(entry).expanduser().is_absolute():
            roots.append(Path(entry).expanduser())
    return [Path(os.path.realpath(r)) for r in roots]


def resolve_state_dir(
    configured: str | None,
    model_dir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Path:
    """The absolute, checked directory for the history; raises StateDirError with the reason."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    knob = "hetserve.state_dir" if configured is not None else STATE_DIR_ENV
    raw = configured if configured is not None else env.get(STATE_DIR_ENV) or None
    if raw is None:
        return Path(os.path.realpath(user_cache_root(env, home) / "hetserve"))
    if not isinstance(raw, str) or not raw.strip():
        raise StateDirError(f"{knob} must be a non-empty path, got {raw!r}")
    expanded = Path(raw.replace("~", str(home), 1) if raw.startswith("~") else raw)
    if not expanded.is_absolute():
        raise StateDirError(
            f"{knob} must be an absolute path (or start with ~), got {raw!r}: a relative one would "
            "land in the worker's working directory, which is the unpacked model"
        )
    resolved = Path(os.path.realpath(expanded))
    model = Path(os.path.realpath(model_dir))
    if resolved == model or model in resolved.parents:
        raise StateDirError(
            f"{knob} {raw!r} is inside the model directory {model}: the history would be taken "
            "for a tampered archive file at the next worker start"
        )
    roots = allowed_roots(env, home)
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise StateDirError(
            f"{knob} {raw!r} ({resolved}) is outside the allowed roots "
            f"{', '.join(map(str, roots))}; an operator allows another with {STATE_ROOTS_ENV} "
            "in TorchServe's environment"
        )
    return resolved


HISTORY_SUFFIX = "-perf.json"


def state_dir(
    configured: str | os.PathLike[str] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The directory for performance histories, resolved and checked as a worker does it; the
    current directory stands in for the model directory of an offline tool."""
    return resolve_state_dir(
        None if configured is None else os.fspath(configured), model_dir or Path.cwd()
    )


def state_file(
    model_name: str,
    manifest_digest: str,
    configured_dir: str | os.PathLike[str] | None = None,
    key: str = "",
    model_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """``<model>-<12 hex of the manifest digest>[-<history key>]-perf.json`` in the state dir;
    the key names the served stages and core-group shape (``handlers.artifact.history_key``)."""
    suffix = f"-{key}" if key else ""
    return state_dir(configured_dir, model_dir) / (
        f"{model_name}-{manifest_digest[:12]}{suffix}{HISTORY_SUFFIX}"
    )


def histories_of(model_name: str, configured_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Every history file of ``model_name`` (any manifest), oldest first."""
    found = state_dir(configured_dir).glob(f"{model_name}-*{HISTORY_SUFFIX}")
    return sorted(found, key=lambda p: p.stat().st_mtime)
