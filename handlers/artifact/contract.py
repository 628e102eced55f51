"""The archive contract in one place: what a ``.mar`` (or its unpacked model directory) holds,
where its performance history lives, and which executors a CPU worker builds from it.

The runtime and every offline tool (CLI, tuner, advisor, benchmarks) go through here instead of
re-deriving file names, JSON fields or grouping rules by hand:

* ``read_archive``: a ``.mar`` or a model directory -> ``Archive`` (the typed ``Manifest``, the
  digest the state file is named after, model-config.yaml). It parses and checks the manifest;
  the serving path additionally verifies every file's hash (``load_verified_manifest``).
* ``state_file``: the one naming rule for the performance history,
  ``<state dir>/<model>-<first 12 hex of the manifest's SHA-256>-perf.json``, with the state
  dir resolved as the runtime does (explicit, then ``HETSERVE_STATE_DIR``, then
  ``~/.cache/hetserve``).
* ``cpu_layout``: the executors that may run each stage in one CPU-only worker, computed with
  the runtime's own grouping (``plan_groups`` + ``split_cpu_groups``).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handlers.artifact.history_key import history_key
from handlers.artifact.manifest import MANIFEST_NAME, Manifest, ManifestError
from handlers.artifact.state_dir import STATE_DIR_ENV, resolve_state_dir
from handlers.hardware.topology import plan_groups, split_cpu_groups

MODEL_CONFIG_FILE = "model-config.yaml"
HISTORY_SUFFIX = "-perf.json"
__all__ = ["STATE_DIR_ENV", "Archive", "read_archive", "state_dir", "state_file", "histories_of"]


@dataclass(frozen=True)
class Archive:
    manifest: Manifest
    manifest_digest: str  # SHA-256 of hetserve-manifest.json as stored: names the state file
    model_config: dict[str, Any] = field(default_factory=dict)  # model-config.yaml ({} if none)

    @property
    def hetserve_section(self) -> dict[str, Any]:
        return dict(self.model_config.get("hetserve") or {})

    @property
    def partitioned(self) -> bool:
        return bool(self.manifest.partitions)

    def state_path(self, state_dir: str | os.PathLike[str] | None = None) -> Path:
        """Where a worker serving this archive keeps its history: ``state_dir`` if given, else
        the archive's own ``hetserve.state_dir``, else the environment's or the default."""
        section = self.hetserve_section
        configured = state_dir or section.get("state_dir")
        key = history_key(
            self.manifest, section.get("ratio"), section.get("core_groups") or "numa",
            int(section.get("cpu_head_groups") or 0), section.get("precision") or "float32",
        )
        return state_file(self.manifest.model_name, self.manifest_digest, configured, key)


def read_archive(source: str | os.PathLike[str]) -> Archive:
    """A ``.mar`` file or an unpacked model directory; ``ManifestError`` if it is not one."""
    source = Path(source)
    if source.is_dir():
        raw = _read_optional(source / MANIFEST_NAME)
        config_text = _read_optional(source / MODEL_CONFIG_FILE)
    else:
        try:
            with zipfile.ZipFile(source) as archive:
                names = set(archive.namelist())
                raw = archive.read(MANIFEST_NAME) if MANIFEST_NAME in names else None
                config_text = (
                    archive.read(MODEL_CONFIG_FILE) if MODEL_CONFIG_FILE in names else None
                )
        except (OSError, zipfile.BadZipFile) as exc:
            raise ManifestError(f"{source} is not a readable model archive: {exc}") from None
    if raw is None:
        raise ManifestError(f"{source} is not a hetserve archive (no {MANIFEST_NAME})")
    try:
        manifest = Manifest.from_json(json.loads(raw))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{source}: {MANIFEST_NAME}: {exc}") from None
    return Archive(manifest, hashlib.sha256(raw).hexdigest(), _parse_config(config_text))


def state_dir(
    configured: str | os.PathLike[str] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The directory for performance histories, resolved and checked as the runtime does it
    (``handlers.artifact.state_dir``: expanded, absolute, outside the model, allowed root)."""
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


def cpu_layout(
    hetserve_section: Mapping[str, Any], partitioned: bool, topology: Any
) -> dict[str, tuple[str, ...]]:
    """Stage -> the executors that may run it in one CPU-only worker on ``topology``:
    {"whole": ...} or {"head": ..., "tail": ...}, named as the runtime names its groups."""
    policy = hetserve_section.get("core_groups") or "numa"
    groups = plan_groups(topology, policy, min_groups=2 if partitioned else 1)
    if not partitioned:
        return {"whole": tuple(g.name for g in groups)}
    head, tail = split_cpu_groups(groups, int(hetserve_section.get("cpu_head_groups") or 0))
    return {"head": tuple(g.name for g in head), "tail": tuple(g.name for g in tail)}


def _read_optional(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _parse_config(text: bytes | None) -> dict[str, Any]:
    if text is None:
        return {}
    import yaml  # offline tools only: the serving path gets the config from TorchServe

    return yaml.safe_load(text) or {}
