"""Which performance history a worker may start from (issue 17, item 5).

Timings belong to the stages that were timed and the core groups that ran them: a ratio-0.9
head is not a ratio-0.5 head (1.8-5x apart), and a group of 4 cores is not a group of 2. The key
hashes the served stages' SHA-256 digests (from the verified manifest) with the knobs that shape
the core groups; CPU executor names already carry their core list.
"""

from __future__ import annotations

import hashlib
import json

from handlers.artifact.manifest import Manifest


def history_key(
    manifest: Manifest, ratio: float | None, core_groups: str, cpu_head_groups: int = 0
) -> str:
    """12 hex digits naming (served stages, core-group shape)."""
    partition = manifest.partition_for(ratio)
    stages = [manifest.whole_model] if partition is None else [partition.head, partition.tail]
    material = {
        "stages": [manifest.files[s].sha256 if s in manifest.files else s for s in stages],
        "core_groups": core_groups,
        "cpu_head_groups": cpu_head_groups,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]
