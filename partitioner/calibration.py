"""Calibration inputs for ``hetserve archive --quantize int8 --calibration DIR``, read the way
requests bring them: images through the archive's image processor, text through its tokenizer,
tensors from ``.npy``/``.npz`` files. Each input is one sample (batch 1) as model feeds.

Files are taken in sorted order (subfolders included); hidden files are skipped, and so are
files of other kinds (named in one warning line). A ``.txt`` file holds one text per non-empty
line. A ``.npy`` file fills the model's one input (with or without a leading batch dim); a
``.npz`` names every input (``numpy.savez(f, input_ids=..., attention_mask=...)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handlers.artifact.manifest import Manifest, TensorSpec
from handlers.errors import RequestError
from handlers.processors import Processors, ProcessorsConfig

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
TEXT_SUFFIXES = frozenset({".txt"})
TENSOR_SUFFIXES = frozenset({".npy", ".npz"})
DEFAULT_MAX_INPUTS = 512

Feeds = dict[str, np.ndarray]


class CalibrationError(ValueError):
    """The calibration directory cannot feed this model; the message says which file and why."""


@dataclass(frozen=True)
class CalibrationSet:
    feeds: tuple[Feeds, ...]
    source: str  # "directory" or "random"
    kinds: dict[str, int] = field(default_factory=dict)  # image/text/tensor -> inputs
    notes: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "inputs": len(self.feeds), "kinds": dict(self.kinds),
                **({"notes": list(self.notes)} if self.notes else {})}


def usable_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """(files this module reads, other files) under ``directory``, sorted, hidden ones left out."""
    known = IMAGE_SUFFIXES | TEXT_SUFFIXES | TENSOR_SUFFIXES
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    return [p for p in files if p.suffix.lower() in known], [p for p in files if p.suffix.lower() not in known]


def read_directory(
    directory: Path,
    manifest: Manifest,
    processors: Mapping[str, Any] | None,
    model_dir: Path,
    max_inputs: int = DEFAULT_MAX_INPUTS,
) -> CalibrationSet:
    """Every input in ``directory`` as batch-1 feeds (evenly thinned to ``max_inputs``)."""
    files, others = usable_files(directory)
    if not files:
        raise CalibrationError(
            f"--calibration {directory}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}), "
            "text (.txt) or tensors (.npy, .npz) in it"
        )
    loaded = Processors.load(ProcessorsConfig.from_mapping(processors), model_dir, manifest)
    feeds: list[Feeds] = []
    kinds: dict[str, int] = {}
    skipped_texts = 0
    for path in files:
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            new, kind = [_image(path, loaded, manifest)], "image"
        elif suffix in TEXT_SUFFIXES:
            new, skipped = _texts(path, loaded)
            kind, skipped_texts = "text", skipped_texts + skipped
        else:
            new, kind = _tensors(path, manifest.inputs), "tensor"
        feeds += new
        kinds[kind] = kinds.get(kind, 0) + len(new)
    notes = []
    if others:
        notes.append(f"{len(others)} file(s) of other kinds left out (e.g. {others[0].name})")
    if skipped_texts:
        notes.append(f"{skipped_texts} text line(s) over the model's token limit left out")
    if len(feeds) > max_inputs:
        keep = np.linspace(0, len(feeds) - 1, max_inputs).round().astype(int)
        notes.append(f"{len(feeds)} inputs thinned evenly to {max_inputs}")
        feeds = [feeds[i] for i in keep]
    return CalibrationSet(tuple(feeds), "directory", kinds, tuple(notes))


def _image(path: Path, processors: Processors | None, manifest: Manifest) -> Feeds:
    if processors is None or processors.image_input is None or processors.config.image is None:
        raise CalibrationError(
            f"--calibration: {path.name} is an image but the archive declares no image processor "
            "(--image-processor imagenet|FILE.json); give .npy/.npz tensors instead"
        )
    from handlers.processors.image import decode_image

    try:
        pixels = decode_image(path.read_bytes(), processors.config.image, path.name)
    except RequestError as exc:
        raise CalibrationError(f"--calibration: {exc.message}") from None
    spec = next(s for s in manifest.inputs if s.name == processors.image_input)
    return {spec.name: pixels[None].astype(spec.dtype, copy=False)}


def _texts(path: Path, processors: Processors | None) -> tuple[list[Feeds], int]:
    """One text per non-empty line; lines the archive would refuse (too long) are counted."""
    if processors is None or processors.text is None:
        raise CalibrationError(
            f"--calibration: {path.name} is text but the archive declares no tokenizer "
            "(--tokenizer tokenizer.json); give .npy/.npz tensors instead"
        )
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise CalibrationError(f"--calibration: {path.name} is not UTF-8 text") from None
    out, skipped = [], 0
    for line in filter(None, lines):
        try:
            out.append(processors.text.encode([line]))
        except RequestError:
            skipped += 1
    return out, skipped


def _tensors(path: Path, inputs: tuple[TensorSpec, ...]) -> list[Feeds]:
    try:
        if path.suffix.lower() == ".npy":
            if len(inputs) != 1:
                raise CalibrationError(
                    f"--calibration: {path.name}: a .npy file fills one input, the model has "
                    f"{len(inputs)} ({', '.join(s.name for s in inputs)}); use .npz with one array per input"
                )
            arrays = {inputs[0].name: np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        if isinstance(exc, CalibrationError):
            raise
        raise CalibrationError(f"--calibration: {path.name} is not a readable {path.suffix} file: {exc}") from None
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise CalibrationError(f"--calibration: {path.name} lacks input(s) {missing} (has {sorted(arrays)})")
    batched = {s.name: _batched(path, s, arrays[s.name]) for s in inputs}
    rows = {a.shape[0] for a in batched.values()}
    if len(rows) != 1:
        raise CalibrationError(f"--calibration: {path.name}: its arrays hold different numbers of samples {sorted(rows)}")
    return [{name: a[i : i + 1] for name, a in batched.items()} for i in range(rows.pop())]


def _batched(path: Path, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    if array.ndim == len(spec.shape) - 1:
        array = array[None]
    if array.ndim != len(spec.shape) or any(
        want is not None and got != want for want, got in zip(spec.sample_shape, array.shape[1:], strict=True)
    ):
        raise CalibrationError(
            f"--calibration: {path.name}: {spec.name!r} has shape {list(array.shape)}, the model "
            f"takes {['batch' if d is None else d for d in [None, *spec.sample_shape]]}"
        )
    try:
        return array.astype(spec.dtype, casting="same_kind")
    except TypeError:
        raise CalibrationError(
            f"--calibration: {path.name}: {spec.name!r} is {array.dtype}, the model takes {spec.dtype}"
        ) from None
