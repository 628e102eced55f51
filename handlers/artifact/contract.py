"""The archive contract in one place: what a ``.mar`` (or its unpacked model directory) holds,
where its performance history lives, and which executors a CPU worker builds from it.

The runtime and every offline tool (CLI, tuner, advisor, benchmarks) go through here instead of
re-deriving file names, JSON fields or grouping rules by hand:

* ``read_archive``: a ``.mar`` or a model directory -> ``Archive`` (the typed ``Manifest``, the
  digest the state file is named after, model-config.yaml and its ``hetserve:`` section as the
  runtime's own validated ``RuntimeConfig``). It parses and checks the manifest; the serving path
  additionally verifies every file's hash (``load_verified_manifest``).
* ``state_file``: the one naming rule for the performance history,
  ``<state dir>/<model>-<first 12 hex of the manifest's SHA-256>-perf.json``, with the state
  dir resolved as the runtime does (explicit, then ``HETSERVE_STATE_DIR``, then
  ``~/.cache/hetserve``); it lives in ``handlers.artifact.state_dir``, re-exported here.
* ``serves_split``: whether a worker serves head + tail or the whole model, for tools that have
  a ratio but no resolved partition (it lives in ``handlers.artifact.manifest``, re-exported here).

It reads ``RuntimeConfig`` (``handlers.runtime.config``), so it sits above the runtime: the
serving path below the service never imports it.
* ``cpu_layout``: the executors that may run each stage in one CPU-only worker, computed with
  the runtime's own grouping (``plan_groups`` + ``split_cpu_groups``).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from handlers.artifact.history_key import history_key
from handlers.artifact.manifest import (
    MANIFEST_NAME,
    WHOLE_MODEL,
    Manifest,
    ManifestError,
    serves_split,
)
from handlers.artifact.state_dir import (
    HISTORY_SUFFIX,
    STATE_DIR_ENV,
    histories_of,
    state_dir,
    state_file,
)
from handlers.hardware.topology import Topology, plan_groups, split_cpu_groups
from handlers.runtime.config import RuntimeConfig

MODEL_CONFIG_FILE = "model-config.yaml"
__all__ = ["HISTORY_SUFFIX", "STATE_DIR_ENV", "WHOLE_MODEL", "Archive", "cpu_layout", "histories_of",
           "read_archive", "serves_split", "state_dir", "state_file"]


@dataclass(frozen=True)
class Archive:
    manifest: Manifest
    manifest_digest: str  # SHA-256 of hetserve-manifest.json as stored: names the state file
    model_config: dict[str, Any] = field(default_factory=dict)  # model-config.yaml ({} if none)

    @cached_property
    def config(self) -> RuntimeConfig:
        """The ``hetserve:`` section as the runtime reads it (``ConfigError`` names a bad knob)."""
        return RuntimeConfig.from_model_yaml(self.model_config)

    @property
    def partitioned(self) -> bool:
        """Whether a worker serving this archive as configured runs head + tail."""
        return serves_split(self.config.ratio, self.manifest.default_ratio)

    def state_path(self, state_dir: str | os.PathLike[str] | None = None) -> Path:
        """Where a worker serving this archive keeps its history: ``state_dir`` if given, else
        the archive's own ``hetserve.state_dir``, else the environment's or the default."""
        config = self.config
        key = history_key(self.manifest, config.ratio, config.core_groups, config.cpu_head_groups,
                          config.precision)
        return state_file(
            self.manifest.model_name, self.manifest_digest, state_dir or config.state_dir, key
        )


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


def cpu_layout(
    config: RuntimeConfig, partitioned: bool, topology: Topology
) -> dict[str, tuple[str, ...]]:
    """Stage -> the executors that may run it in one CPU-only worker on ``topology``:
    {"whole": ...} or {"head": ..., "tail": ...}, named as the runtime names its groups."""
    groups = plan_groups(topology, config.core_groups, min_groups=2 if partitioned else 1)
    if not partitioned:
        return {"whole": tuple(g.name for g in groups)}
    head, tail = split_cpu_groups(groups, config.cpu_head_groups)
    return {"head": tuple(g.name for g in head), "tail": tuple(g.name for g in tail)}


def _read_optional(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _parse_config(text: bytes | None) -> dict[str, Any]:
    if text is None:
        return {}
    import yaml  # offline tools only: the serving path gets the config from TorchServe

    return yaml.safe_load(text) or {}
