"""Everything ``hetserve archive`` can check before it spends time exporting and cutting.

Pure functions over the command's inputs; each raises ``ArchiveInputError`` with one line that
names the wrong value and, for a misspelt key, the nearest known one. TorchServe ignores model-config
keys it does not know (``batchsize`` silently serves batch 1), so unknown keys are errors here.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

# torch-model-archiver's own rule (ModelExportUtils.check_model_name_regex_or_exit).
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")

# The keys TorchServe 0.12's frontend reads from model-config.yaml (archive.model.ModelConfig),
# with the type it parses each as.
_INT, _BOOL = "an integer >= 0", "true or false"
# hetserve archive turns "auto" into this box's count (partitioner.auto_workers) before TorchServe reads it.
_WORKERS = "an integer >= 0 or 'auto'"
TORCHSERVE_KEYS: dict[str, str] = {
    "minWorkers": _WORKERS, "maxWorkers": _WORKERS, "batchSize": _INT, "maxBatchDelay": _INT,
    "responseTimeout": _INT, "startupTimeout": _INT, "jobQueueSize": _INT, "parallelLevel": _INT,
    "sequenceMaxIdleMSec": _INT, "sequenceTimeoutMSec": _INT, "maxNumSequence": _INT,
    "maxSequenceJobQueueSize": _INT, "clientTimeoutInMills": _INT, "maxRetryTimeoutInSec": _INT,
    "useJobTicket": _BOOL, "sequenceBatching": _BOOL, "continuousBatching": _BOOL,
    "asyncCommunication": _BOOL, "useVenv": _BOOL,
    "deviceType": "one of cpu, gpu, neuron", "parallelType": "one of pp, tp, pptp, custom",
    "deviceIds": "a list of integers", "torchrun": "a mapping",
}
HETSERVE_SECTION = "hetserve"
# Names hetserve itself puts at the archive's root: an extra file may not replace one.
RESERVED_ARCHIVE_NAMES = frozenset(
    {"handlers", "hetserve-manifest.json", "model-config.yaml", "hetserve_handler.py", "MAR-INF",
     "model.onnx", "profile.json", "weights-int8.bin"})


class ArchiveInputError(ValueError):
    """A user mistake in the archive command's inputs; the message is one line."""


def did_you_mean(word: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    if not close:
        lowered = {k.lower(): k for k in known}
        close = [lowered[word.lower()]] if word.lower() in lowered else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_model_name(name: str) -> None:
    if not MODEL_NAME_RE.match(name):
        raise ArchiveInputError(
            f"--model-name {name!r} is not a TorchServe model name: start with a letter or digit, "
            "then letters, digits, '_', '-' or '.'")


def check_target(export_path: Path, model_name: str, force: bool) -> Path:
    """The .mar path, after checking it can be written (and may be, without --force)."""
    if export_path.exists() and not export_path.is_dir():
        raise ArchiveInputError(f"--export-path {export_path} exists and is not a folder")
    target = export_path / f"{model_name}.mar"
    if target.exists() and not force:
        raise ArchiveInputError(f"{target} exists; pass -f/--force to overwrite it")
    if target.is_dir():
        raise ArchiveInputError(f"{target} is a folder; the archive needs that name")
    existing = export_path
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArchiveInputError(f"--export-path {export_path}: {existing} is not writable")
    return target


def check_ratios(ratios: Sequence[float], default_ratio: float | None, served_ratio: Any) -> None:
    for r in ratios:
        if not 0.0 < r < 1.0:
            raise ArchiveInputError(f"--ratios: {r:g} is not strictly between 0 and 1 (the head's share)")
    if len(set(ratios)) != len(ratios):
        raise ArchiveInputError(f"--ratios lists a ratio twice: {','.join(f'{r:g}' for r in ratios)}")
    listed = ", ".join(f"{r:g}" for r in ratios)
    for flag, value in (("--default-ratio", default_ratio), ("hetserve.ratio", served_ratio)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ArchiveInputError(f"{flag} must be a number, got {value!r}")
        if value >= 1.0:
            continue  # the whole model, always in the archive
        if not any(abs(value - r) < 1e-9 for r in ratios):
            raise ArchiveInputError(
                f"{flag} {value:g} is not among the archived ratios ({listed}); add it to --ratios or use >= 1 for the whole model")


def check_model_config(config: Mapping[str, Any]) -> None:
    """Top-level keys against TorchServe's, the hetserve section against RuntimeConfig."""
    from handlers.runtime.config import RuntimeConfig

    known_top = [*TORCHSERVE_KEYS, HETSERVE_SECTION]
    for key, value in config.items():
        if key == HETSERVE_SECTION:
            continue
        if key not in TORCHSERVE_KEYS:
            raise ArchiveInputError(
                f"unknown model-config key {key!r}{did_you_mean(str(key), known_top)}; "
                "TorchServe would ignore it silently")
        _check_type(key, value, TORCHSERVE_KEYS[key])
    section = config.get(HETSERVE_SECTION)
    if section is None:
        return
    if not isinstance(section, Mapping):
        raise ArchiveInputError(f"model-config key 'hetserve' must be a mapping, got {section!r}")
    knobs = [f.name for f in fields(RuntimeConfig)]
    for key in section:
        if key not in knobs:
            raise ArchiveInputError(f"unknown option 'hetserve.{key}'{did_you_mean(str(key), knobs)}")
    try:
        RuntimeConfig.from_model_yaml(config)
    except ValueError as exc:
        raise ArchiveInputError(str(exc).splitlines()[0]) from None


def _check_type(key: str, value: Any, kind: str) -> None:
    count = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    ok = {
        _INT: count,
        _WORKERS: count or value == "auto",
        _BOOL: isinstance(value, bool),
        "a list of integers": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        "a mapping": isinstance(value, Mapping),
    }.get(kind)
    if ok is None:  # "one of a, b"
        ok = str(value) in kind.removeprefix("one of ").split(", ")
    if not ok:
        hint = did_you_mean(value, ["auto"]) if kind == _WORKERS and isinstance(value, str) else ""
        raise ArchiveInputError(f"model-config key {key!r} must be {kind}, got {value!r}{hint}")


def check_extra_files(paths: Sequence[Path]) -> None:
    names: dict[str, Path] = {}
    for path in paths:
        if not path.exists():
            raise ArchiveInputError(f"--extra-files: {path} does not exist")
        if path.is_symlink():
            raise ArchiveInputError(f"--extra-files: {path} is a symbolic link; archives may not contain links")
        if path.name in RESERVED_ARCHIVE_NAMES or path.suffix == ".onnx" or path.name.startswith("stage-r"):
            raise ArchiveInputError(f"--extra-files: {path.name!r} would collide with a file hetserve writes")
        if path.name in names:
            raise ArchiveInputError(f"--extra-files: {path} and {names[path.name]} share the name {path.name!r}")
        names[path.name] = path


def check_requirements_file(path: Path | None) -> None:
    if path is not None and not path.is_file():
        raise ArchiveInputError(f"--requirements-file: {path} is not a file")


def check_quantize(quantize: str | None, calibration: Path | None, min_accuracy: float,
                   served_precision: Any) -> None:
    """The int8 flags agree with each other and with hetserve.precision, before any export."""
    if calibration is not None and not quantize:
        raise ArchiveInputError("--calibration is for int8 stages: add --quantize int8")
    if served_precision not in (None, "float32") and served_precision != quantize:
        raise ArchiveInputError(
            f"hetserve.precision is {served_precision!r} but the archive would have no "
            f"{served_precision} stages: add --quantize {served_precision}")
    if not 0.0 < min_accuracy < 2.0:
        raise ArchiveInputError(
            f"--min-accuracy {min_accuracy:g}: give a fraction such as 0.99 (top-1 agreement or cosine)")
    if calibration is None:
        return
    if not calibration.is_dir():
        raise ArchiveInputError(f"--calibration {calibration} is not a folder")
    from partitioner.calibration import usable_files

    if not usable_files(calibration)[0]:
        raise ArchiveInputError(
            f"--calibration {calibration}: no images (.jpg, .jpeg, .png, .webp), text (.txt) or "
            "tensors (.npy, .npz) in it")
