"""Archives for issue 16's TorchServe rows that are not hetserve: the stock BaseHandler serving the
same ``.onnx`` through its ONNX Runtime path, and the no-work handler of the frontend ceiling.

Both are built next to the hetserve archive in the same model store, with the same
model-config.yaml (workers, batchSize, maxBatchDelay), so a row differs only in its handler.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

BASELINE = Path(__file__).resolve().parent / "baseline"


def _archive(name: str, store: Path, handler: Path, config: dict, serialized: Path | None) -> Path:
    import yaml
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    mar = store / f"{name}.mar"
    if mar.exists():
        return mar
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(config))
        generate_model_archive(ModelArchiverConfig(
            model_name=name, handler=str(handler), version="1.0",
            serialized_file=str(serialized) if serialized else None, export_path=str(store),
            force=True, config_file=str(config_file),
        ))
    return mar


def mar_from_model_dir(model_dir: Path, store: Path, name: str) -> Path:
    """A hetserve archive of a model directory that ``gpu_serving.py`` built: the same stages,
    without a second export, profile and cut (minutes of device time per model)."""
    from dataclasses import replace

    from handlers.artifact.manifest import (
        MANIFEST_NAME,
        FileEntry,
        read_manifest,
        sha256_file,
        write_manifest,
    )
    from partitioner.archive import copy_runtime, model_config, package

    mar = store / f"{name}.mar"
    if mar.exists():
        return mar
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "stage"
        shutil.copytree(model_dir, stage)
        copy_runtime(stage)
        # The manifest vouches for every file the handler may run, its own code included, as
        # ``hetserve archive`` writes it: hash the runtime that was just copied in.
        files = {p.relative_to(stage).as_posix(): FileEntry(sha256_file(p), p.stat().st_size)
                 for p in sorted(stage.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
        write_manifest(replace(read_manifest(stage), files=files), stage)
        package(stage, name, store, model_config(None))
    return mar


def whole_onnx(hetserve_mar: Path, work: Path) -> Path:
    """The whole model out of a hetserve archive as one self-contained ``.onnx`` (the archive
    keeps the weights in a file its stages share; a stock user serves a single file), once."""
    import onnx

    out = work / f"{hetserve_mar.stem}-whole.onnx"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(hetserve_mar) as archive:
        manifest = json.loads(archive.read("hetserve-manifest.json"))
        archive.extractall(tmp)
        model = onnx.load(str(Path(tmp) / manifest["whole_model"]))  # external data read too
        onnx.save_model(model, str(out), save_as_external_data=False)
    return out


def build_stock_onnx_mar(hetserve_mar: Path, store: Path, config: dict, tag: str = "") -> Path:
    """Stock BaseHandler + the same ``.onnx`` as the hetserve archive (BaseHandler's ORT path)."""
    name = f"stockort_{hetserve_mar.stem.replace('-', '_')}{tag}"
    model = whole_onnx(hetserve_mar, store.parent)
    return _archive(name, store, BASELINE / "stock_onnx_handler.py", config, model)


def build_noop_mar(store: Path, config: dict, tag: str = "") -> Path:
    """The no-work handler (``baseline/noop_handler.py``): the frontend's ceiling."""
    return _archive(f"noop{tag}", store, BASELINE / "noop_handler.py", config, None)
