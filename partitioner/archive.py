"""Pack a stage directory, the handler and its runtime into one ``.mar`` with torch-model-archiver.

The runtime package (``handlers/``) travels inside the archive, so a ``.mar`` serves on any
TorchServe with onnxruntime and numpy installed (a stock KServe image, say), not only here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

import handlers
from handlers.artifact.archive_digest import DIGEST_ENV
from handlers.artifact.manifest import MANIFEST_NAME
from handlers.connection_guard import batching_problems

HANDLER_ENTRY = "hetserve_handler.py"
MODEL_CONFIG_FILE = "model-config.yaml"


def copy_runtime(dest: Path) -> None:
    """Copy the ``handlers`` package tree (Python sources only) into ``dest/handlers``."""
    src = Path(handlers.__file__).resolve().parent
    target = dest / "handlers"
    for path in sorted(src.rglob("*.py")):
        relative = path.relative_to(src)
        if "__pycache__" in relative.parts:
            continue
        (target / relative.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / relative)


def model_config(base: Path | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The archive's model-config.yaml: the project's defaults, then the caller's overrides."""
    from partitioner.defaults import MODEL_CONFIG, default_file

    path = base if base is not None else default_file(MODEL_CONFIG)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"{path} must hold a mapping of model-config keys")
    merged = merge_config(config, overrides or {})
    warnings, errors = batching_problems(merged)  # before any cutting: fail early
    if errors:
        raise ValueError("; ".join(errors))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return merged


def merge_config(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` on top of ``config``; a nested mapping (the hetserve section) merges key by key."""
    merged = dict(config)
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            merged[key] = {**(merged.get(key) or {}), **value}
        else:
            merged[key] = value
    return merged


def package(
    stage_dir: Path,
    model_name: str,
    export_path: Path,
    config: Mapping[str, Any],
    version: str = "1.0",
    force: bool = False,
    archive_format: str = "zip-store",
    requirements_file: Path | None = None,
) -> Path:
    """Build ``export_path/model_name.mar`` from ``stage_dir`` (which already holds ``handlers/``)."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    from partitioner.auto_workers import PRODUCER_KEY, resolve_here

    for warning in response_size_warnings(stage_dir, config):
        print(f"warning: {warning}", file=sys.stderr)
    # TorchServe parses the worker counts as integers: "auto" becomes this box's count here.
    config, workers = resolve_here(config)
    if workers is not None:
        print(workers.note())
    export_path.mkdir(parents=True, exist_ok=True)
    target = export_path / f"{model_name}.mar"
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite it")
    with tempfile.TemporaryDirectory(prefix="hetserve-mar-") as scratch:
        config_path = Path(scratch) / MODEL_CONFIG_FILE
        config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        # The manifest vouches for every file of the archive, the code TorchServe imports first
        # and the config it reads included (issue 17, item 7).
        digest = cover_packaging_files(
            stage_dir, stage_dir / "handlers" / HANDLER_ENTRY, config_path.read_bytes(),
            producer_facts={PRODUCER_KEY: workers.to_json()} if workers is not None else None,
        )
        archiver_config = ModelArchiverConfig(
            model_name=model_name,
            handler=str(stage_dir / "handlers" / HANDLER_ENTRY),
            version=version,
            extra_files=str(stage_dir),
            export_path=str(export_path),
            archive_format=archive_format,  # zip-store: weights do not compress, deflate only costs time
            force=True,
            config_file=str(config_path),
            requirements_file=str(requirements_file) if requirements_file else None,
        )
        # The archiver stages files in tempfile.gettempdir()/model_name and deletes that folder:
        # give it a private temp dir so concurrent builds of one model name cannot collide.
        with _private_tempdir(scratch):
            generate_model_archive(archiver_config)
    if digest:
        print(f"{target.name}: manifest SHA-256 {digest} (pin it with {DIGEST_ENV}={model_name}={digest})")
    return target


def cover_packaging_files(stage_dir: Path, entry_handler: Path, config_bytes: bytes,
                          producer_facts: Mapping[str, Any] | None = None) -> str:
    """List the top-level entry handler and model-config.yaml in the stage directory's manifest,
    and add ``producer_facts`` (how the archive was made, e.g. derived worker counts) to its
    ``producer``; returns the manifest's new SHA-256 ("" when the directory has no manifest)."""
    path = stage_dir / MANIFEST_NAME
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    if producer_facts:
        data["producer"] = {**(data.get("producer") or {}), **producer_facts}
    handler = entry_handler.read_bytes()
    data["files"][HANDLER_ENTRY] = _entry(handler)
    data["files"][MODEL_CONFIG_FILE] = _entry(config_bytes)
    raw = (json.dumps(data, indent=2) + "\n").encode()
    path.write_bytes(raw)
    return hashlib.sha256(raw).hexdigest()


def _entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def response_size_warnings(stage_dir: Path, config: Mapping[str, Any]) -> list[str]:
    """One sample's answer already over the response limit: every request would get a 413."""
    from handlers.artifact.manifest import Manifest
    from handlers.protocol.response_size import archive_warnings

    path = stage_dir / MANIFEST_NAME
    if not path.is_file():
        return []
    limits = (config.get("hetserve") or {}).get("limits")
    return archive_warnings(Manifest.from_json(json.loads(path.read_text())).outputs, limits)


@contextmanager
def _private_tempdir(path: str):
    saved = tempfile.tempdir
    tempfile.tempdir = path
    try:
        yield
    finally:
        tempfile.tempdir = saved


def with_config(src_mar: Path, dst_mar: Path, overrides: Mapping[str, Any]) -> Path:
    """A copy of ``src_mar`` whose model-config.yaml has ``overrides`` applied (nested dicts merge).

    Only model-config.yaml and its entry in the manifest change, so the stages and their
    verification carry over: benchmarks and the tuner try configurations without re-cutting.
    """
    with zipfile.ZipFile(src_mar) as src:
        merged = merge_config(yaml.safe_load(src.read(MODEL_CONFIG_FILE)) or {}, overrides)
        config_bytes = yaml.safe_dump(merged, sort_keys=False).encode()
        manifest = _forget_derived_workers(json.loads(src.read(MANIFEST_NAME)), overrides)
        if MODEL_CONFIG_FILE in manifest.get("files", {}):  # the manifest vouches for the config
            manifest["files"][MODEL_CONFIG_FILE] = _entry(config_bytes)
        replaced = {MODEL_CONFIG_FILE: config_bytes,
                    MANIFEST_NAME: (json.dumps(manifest, indent=2) + "\n").encode()}
        dst_mar.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dst_mar, "w", zipfile.ZIP_STORED) as dst:
            for item in src.infolist():
                dst.writestr(item, replaced.get(item.filename) or src.read(item))
    return dst_mar


def _forget_derived_workers(manifest: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A worker count set by ``overrides`` was asked for: the record of what ``auto`` derived
    (partitioner.auto_workers) no longer covers that key, so tools do not take it for derived."""
    from partitioner.auto_workers import PRODUCER_KEY, WORKER_KEYS

    producer = manifest.get("producer") or {}
    derived = producer.get(PRODUCER_KEY)
    set_now = [k for k in WORKER_KEYS if k in overrides]
    if not isinstance(derived, dict) or not set_now:
        return manifest
    keys = [k for k in derived.get("auto_keys", ()) if k not in set_now]
    rest = {k: v for k, v in producer.items() if k != PRODUCER_KEY}
    return {**manifest, "producer": {**rest, **({PRODUCER_KEY: {**derived, "auto_keys": keys}} if keys else {})}}
