"""The archive's processors: the ``hetserve.processors`` section and the files it reads.

Sources, later ones winning key by key: what the model brings (``hf:DIR``), the archive
command's flags (``--labels``, ``--tokenizer``, ``--image-processor``, ``--top-k``), then
``--set hetserve.processors...``. The files are written into the stage directory before the
manifest is hashed, so the handler verifies them like the ONNX files; ``check`` loads the
processors against the finished manifest, so a wrong declaration fails the archive command,
not the first request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handlers.artifact.manifest import Manifest
from handlers.processors import Processors, ProcessorsConfig

IMAGENET = "imagenet"


def declared(
    model_processors: Mapping[str, Any],
    model_files: Mapping[str, bytes],
    *,
    labels: Path | None = None,
    tokenizer: Path | None = None,
    image_processor: str | None = None,
    top_k: int | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, bytes]]:
    """(processors section, archive files) from the model and the command line."""
    section = {kind: dict(values) for kind, values in model_processors.items()}
    files = dict(model_files)
    if labels is not None:
        name = "labels.txt" if labels.suffix.lower() == ".txt" else "labels.json"
        files[name] = labels.read_bytes()
        section.setdefault("labels", {})["labels"] = name
    if tokenizer is not None:
        files["tokenizer.json"] = tokenizer.read_bytes()
        section.setdefault("text", {})["tokenizer"] = "tokenizer.json"
    if image_processor is not None:
        section["image"] = {**section.get("image", {}), **_image(image_processor)}
    if top_k is not None:
        section.setdefault("labels", {})["top_k"] = top_k
    return section, files


def _image(source: str) -> dict[str, Any]:
    if source == IMAGENET:
        return {}  # ImageConfig's defaults: resize 256, center crop 224, ImageNet mean/std
    from partitioner.hf_dir import image_config_from_hf

    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--image-processor {source!r}: give 'imagenet' or a preprocessor_config.json")
    data = json.loads(path.read_text())
    size = data.get("crop_size") or data.get("size") or {}
    default = size.get("height", 224) if isinstance(size, Mapping) else int(size or 224)
    return image_config_from_hf(path.parent, _Size(default), path)


class _Size:
    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.num_channels = 3


def write(stage_dir: Path, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        target = stage_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def check(section: Mapping[str, Any], stage_dir: Path, manifest: Manifest) -> None:
    """Load the processors as a worker would; raises ValueError naming what is wrong."""
    Processors.load(ProcessorsConfig.from_mapping(section), stage_dir, manifest)
