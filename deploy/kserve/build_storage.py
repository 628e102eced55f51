#!/usr/bin/env python3
"""Lay a hetserve .mar out the way hetserve's KServe runtime (and KServe's TorchServe runtime) mount it.

    python deploy/kserve/build_storage.py model_store/resnet18.mar build/kserve/resnet18
    aws s3 cp --recursive build/kserve/resnet18 s3://BUCKET/hetserve/resnet18   # = storageUri

gives
    OUT/config/config.properties   deploy/kserve/config/config.properties, model_snapshot for this .mar
    OUT/model-store/NAME.mar       the archive, byte for byte

KServe mounts the storageUri at /mnt/models and hetserve's runtime (clusterservingruntime.yaml) runs
``torchserve --start --foreground --ncs --model-store /mnt/models/model-store --ts-config /mnt/models/config/config.properties``;
TorchServe loads the models ``model_snapshot`` names. The snapshot's batch
and timeout values are copied from the archive's model-config.yaml, so the .mar stays the one
place where they (and the whole ``hetserve:`` section) are set.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

import yaml

TEMPLATE = Path(__file__).resolve().parent / "config" / "config.properties"
SNAPSHOT_KEY = "model_snapshot"
# TorchServe names a model after its .mar file; keep names that are safe in URLs and paths.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class LayoutError(ValueError):
    """An archive or template that cannot be deployed as is; the message says why."""


def read_archive(mar: Path) -> tuple[dict, dict, dict]:
    """(MAR-INF/MANIFEST.json, model-config.yaml, hetserve-manifest.json) of a hetserve .mar."""
    try:
        with zipfile.ZipFile(mar) as archive:
            names = set(archive.namelist())
            if "hetserve-manifest.json" not in names:
                raise LayoutError(f"{mar} is not a hetserve archive (no hetserve-manifest.json)")
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
            config = yaml.safe_load(archive.read("model-config.yaml")) or {}
            hetserve_manifest = json.loads(archive.read("hetserve-manifest.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise LayoutError(f"{mar} is not a readable model archive: {exc}") from None
    if not isinstance(hetserve_manifest, dict) or not isinstance(config, dict):
        raise LayoutError(f"{mar}: hetserve-manifest.json and model-config.yaml must hold mappings")
    return manifest, config, hetserve_manifest


def pod_workers_note(config: dict, hetserve_manifest: dict) -> str | None:
    """None for an archive asking for one worker; a note when its larger count was derived by
    ``minWorkers/maxWorkers: auto`` on the archiving box (the pod serves one instead); raises
    LayoutError when somebody asked for more than one."""
    workers = {key: config.get(key, 1) for key in ("minWorkers", "maxWorkers")}
    over = sorted(key for key, value in workers.items() if value != 1)
    if not over:
        return None
    # hetserve archive records what "auto" became (partitioner/auto_workers.py); a count changed
    # since (with_config) no longer matches the record and counts as asked for.
    derived = (hetserve_manifest.get("producer") or {}).get("workers") or {}
    if derived.get("auto") and all(
        key in derived.get("auto_keys", ()) and derived.get(key) == workers[key] for key in over
    ):
        return (
            f"note: minWorkers/maxWorkers {workers['minWorkers']}/{workers['maxWorkers']} were derived "
            f"on the archiving box ({derived.get('physical_cores')} physical cores, "
            f"{derived.get('gpus')} GPUs); a KServe pod runs one worker: the snapshot asks for 1"
        )
    # A pod is the unit of scale: each worker's handler splits the whole pod's cores into
    # core groups, so two workers in one pod would pin onto the same cores.
    asked = (workers["minWorkers"], workers["maxWorkers"])
    raise LayoutError(
        f"the archive asks for minWorkers/maxWorkers {asked}; a KServe pod runs one worker. "
        "Derive a variant with partitioner.archive.with_config(src, dst, "
        "{'minWorkers': 1, 'maxWorkers': 1}) and scale with replicas instead"
    )


def snapshot(name: str, manifest: dict, config: dict) -> dict:
    """TorchServe's model_snapshot for one model, one worker, values from model-config.yaml."""
    version = str((manifest.get("model") or {}).get("modelVersion") or "1.0")
    entry = {
        "defaultVersion": True,
        "marName": f"{name}.mar",
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": int(config.get("batchSize", 1)),
        # Not TorchServe's 100: a worker death mid-gather drops what it gathered (issue 17).
        "maxBatchDelay": int(config.get("maxBatchDelay", 5)),
        "responseTimeout": int(config.get("responseTimeout", 120)),
    }
    return {"name": "startup.cfg", "modelCount": 1, "models": {name: {version: entry}}}


def render_config(template: str, model_snapshot: dict) -> str:
    lines = template.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith(f"{SNAPSHOT_KEY}=")]
    if len(at) != 1:
        raise LayoutError(f"the template must hold exactly one {SNAPSHOT_KEY}= line")
    # One line: Java properties and the kserve_wrapper both read the value up to the line's end.
    lines[at[0]] = f"{SNAPSHOT_KEY}={json.dumps(model_snapshot, separators=(',', ':'))}"
    return "\n".join(lines) + "\n"


def build(mar: Path, out: Path, name: str | None = None, template: Path = TEMPLATE) -> Path:
    manifest, config, hetserve_manifest = read_archive(mar)
    name = name or (manifest.get("model") or {}).get("modelName") or mar.stem
    if not _NAME.fullmatch(name):
        raise LayoutError(f"model name {name!r} must match {_NAME.pattern}")
    note = pod_workers_note(config, hetserve_manifest)
    if note:
        print(note)
    rendered = render_config(template.read_text(), snapshot(name, manifest, config))
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(parents=True, exist_ok=True)
    (out / "config" / "config.properties").write_text(rendered)
    shutil.copyfile(mar, out / "model-store" / f"{name}.mar")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mar", type=Path, help="a .mar built by `hetserve archive`")
    parser.add_argument("out", type=Path, help="folder to upload as the storageUri")
    parser.add_argument("--name", help="model name in URLs (default: the archive's modelName)")
    args = parser.parse_args(argv)
    try:
        out = build(args.mar, args.out, args.name)
    except (LayoutError, OSError) as exc:
        print(f"build_storage: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}/config/config.properties and {out}/model-store/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
