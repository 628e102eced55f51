"""Which performance history a worker may start from (issue 17, item 5).

Timings belong to the stages that were timed and the core groups that ran them: a ratio-0.9
head is not a ratio-0.5 head (1.8-5x apart), and a group of 4 cores is not a group of 2. The key
hashes the served stages' SHA-256 digests (from the verified manifest) with the knobs that shape
the core groups; CPU executor names already carry their core list. An int8 archive served at
int8 is another set of stages again: its key names the int8 files and the precision.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from handlers.artifact.manifest import FLOAT32, Manifest


def history_key(
    manifest: Manifest,
    ratio: float | None,
    core_groups: str,
    cpu_head_groups: int = 0,
    precision: str = FLOAT32,
) -> str:
    """12 hex digits naming (served stages, core-group shape, precision)."""
    partition = manifest.partition_for(ratio)
    stages = list(manifest.stage_files(partition, FLOAT32).values())
    if precision != FLOAT32:  # float32 keys stay what they were before int8 stages existed
        stages += list(manifest.stage_files(partition, precision).values())
    material: dict[str, Any] = {
        "stages": [manifest.files[s].sha256 if s in manifest.files else s for s in stages],
        "core_groups": core_groups,
        "cpu_head_groups": cpu_head_groups,
    }
    if precision != FLOAT32:
        material["precision"] = precision
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]
