"""What a configuration of knobs becomes: model-config.yaml overrides (an archive variant) and
config.properties keys (the launcher), and the winner's two files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hetserve.properties import merge_properties
from hetserve.tuner.space import launcher_args


@dataclass(frozen=True)
class Settings:
    model_overrides: dict[str, Any]  # merged into the archive's model-config.yaml
    properties: dict[str, str]  # config.properties keys

    @property
    def server_key(self) -> str:
        return json.dumps(self.properties, sort_keys=True)


def trial_settings(params: Mapping[str, Any]) -> Settings:
    w = int(params["workers"])
    section = {k: params[k] for k in ("ratio", "core_groups", "cpu_head_groups", "micro_batch", "spinning")}
    overrides = {"minWorkers": w, "maxWorkers": w, "batchSize": int(params["batchSize"]),
                 "maxBatchDelay": int(params["maxBatchDelay"]), "hetserve": section}
    return Settings(overrides, {"cpu_launcher_args": launcher_args(params["allocator"], params["openmp"])})


def write_winner(out_dir: Path, model_config: Mapping[str, Any], params: Mapping[str, Any],
                 base_properties: Path) -> tuple[Path, Path]:
    """model-config.yaml (the archive's, with the winning knobs) and config.properties."""
    from partitioner.archive import merge_config

    settings = trial_settings(params)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "model-config.yaml"
    config_path.write_text("# written by hetserve tune: the best trial's knobs over the archive's config\n"
                           + yaml.safe_dump(merge_config(model_config, settings.model_overrides), sort_keys=False))
    props_path = out_dir / "config.properties"
    props_path.write_text("# written by hetserve tune: config/config.properties with the best launcher settings\n"
                          + merge_properties(base_properties.read_text(), settings.properties))
    return config_path, props_path
