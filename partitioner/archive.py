"""Pack a stage directory, the handler and its runtime into one ``.mar`` with torch-model-archiver.

The runtime package (``handlers/``) travels inside the archive, so a ``.mar`` serves on any
TorchServe with onnxruntime and numpy installed (a stock KServe image, say), not only here.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

import handlers

HANDLER_ENTRY = "hetserve_handler.py"
MODEL_CONFIG_FILE = "model-config.yaml"
DEFAULT_MODEL_CONFIG = Path(__file__).resolve().parent.parent / "config" / MODEL_CONFIG_FILE


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
    path = base if base is not None else DEFAULT_MODEL_CONFIG
    config = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return merge_config(config, overrides or {})


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
) -> Path:
    """Build ``export_path/model_name.mar`` from ``stage_dir`` (which already holds ``handlers/``)."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    export_path.mkdir(parents=True, exist_ok=True)
    target = export_path / f"{model_name}.mar"
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite it")
    with tempfile.TemporaryDirectory(prefix="hetserve-mar-") as scratch:
        config_path = Path(scratch) / MODEL_CONFIG_FILE
        config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        archiver_config = ModelArchiverConfig(
            model_name=model_name,
            handler=str(stage_dir / "handlers" / HANDLER_ENTRY),
            version=version,
            extra_files=str(stage_dir),
            export_path=str(export_path),
            archive_format=archive_format,  # zip-store: weights do not compress, deflate only costs time
            force=True,
            config_file=str(config_path),
        )
        # The archiver stages files in tempfile.gettempdir()/model_name and deletes that folder:
        # give it a private temp dir so concurrent builds of one model name cannot collide.
        with _private_tempdir(scratch):
            generate_model_archive(archiver_config)
    return target


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

    Only model-config.yaml changes, and the manifest's hashes do not cover it, so the stages and
    their verification carry over: benchmarks and the tuner try configurations without re-cutting.
    """
    with zipfile.ZipFile(src_mar) as src:
        merged = merge_config(yaml.safe_load(src.read(MODEL_CONFIG_FILE)) or {}, overrides)
        dst_mar.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dst_mar, "w", zipfile.ZIP_STORED) as dst:
            for item in src.infolist():
                data = yaml.safe_dump(merged, sort_keys=False).encode() if item.filename == MODEL_CONFIG_FILE else src.read(item)
                dst.writestr(item, data)
    return dst_mar
