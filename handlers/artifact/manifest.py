"""The archive's manifest: what the partitioner promises and the handler checks before loading.

The manifest is JSON (never pickle). It lists every file of the archive with its SHA-256; the
handler refuses to load anything until each listed file exists inside the model directory, is a
regular file (not a link), and hashes to the recorded value, and until every ONNX file's
external data points only at such files (``handlers.artifact.archive_safety``). Every refusal is a
``ManifestError`` whose message names the archive file and the reason, on one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from handlers.artifact.archive_safety import UnsafeModelError, check_external_data, external_refs

# A ratio at or above this serves the whole model (RuntimeConfig.ratio, Manifest.partition_for).
WHOLE_MODEL = 1.0

_log = logging.getLogger(__name__)

MANIFEST_NAME = "hetserve-manifest.json"
MANIFEST_FORMAT = "hetserve-manifest"
MANIFEST_VERSION = 1
# Files TorchServe and torch-model-archiver put next to the manifest's own: they are read by
# TorchServe (or are the handler entry it imports), never by the runtime as data.
# Not listed in the manifest: the manifest itself and the archiver's own record (written after
# the manifest). The entry handler and model-config.yaml are listed (issue 17, item 7).
PACKAGING_FILES = frozenset({MANIFEST_NAME, "MAR-INF/MANIFEST.json"})
COVERED_SINCE_V17 = frozenset({"model-config.yaml", "hetserve_handler.py"})

# numpy dtype names the runtime accepts; ONNX element types map onto these (partitioner side).
SUPPORTED_DTYPES = (
    "float32",
    "float16",
    "float64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)


class ManifestError(ValueError):
    """The archive cannot be trusted or understood; the message says which file and why."""


@dataclass(frozen=True)
class ValueRange:
    """The values an input takes for example runs (profiling, verification, the archive's load
    check, the runtime's calibration): integers in [low, high) when ``integers``, else floats
    uniform in [low, high). Derived offline from the graph (the rows of the smallest table an
    index reaches, masks {0, 1}) and recorded in the manifest, so every example run of an
    archive draws from the same bounds (handlers.artifact.example_inputs)."""

    low: float
    high: float
    integers: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high <= self.low:
            raise ManifestError(f"value range [{self.low}, {self.high}) is empty or not finite")
        if self.integers and (self.low != int(self.low) or self.high != int(self.high)):
            raise ManifestError(f"integer value range [{self.low}, {self.high}) has fractional bounds")

    def to_json(self) -> dict[str, Any]:
        if self.integers:
            return {"low": int(self.low), "high": int(self.high), "integers": True}
        return {"low": self.low, "high": self.high, "integers": False}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ValueRange:
        return cls(
            low=float(_req(data, "low", (int, float))),
            high=float(_req(data, "high", (int, float))),
            integers=bool(_req(data, "integers", bool)),
        )


@dataclass(frozen=True)
class TensorSpec:
    """A model input, output or cut tensor. ``None`` marks a dynamic dimension; dim 0 is batch.

    ``values``: the range example inputs are drawn from (model inputs; optional: archives
    written before it was recorded get a safe default, handlers.artifact.example_inputs)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    values: ValueRange | None = None

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ManifestError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r}")
        if not self.shape:
            raise ManifestError(f"tensor {self.name!r}: needs at least a batch dimension")

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        return self.shape[1:]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.values is not None:
            out["values"] = self.values.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        values = data.get("values") if isinstance(data, dict) else None
        return cls(
            name=_req(data, "name", str),
            dtype=_req(data, "dtype", str),
            shape=tuple(None if d is None else int(d) for d in _req(data, "shape", list)),
            values=None if values is None else ValueRange.from_json(values),
        )


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


# Precisions an archive's stages can come in; float32 is always there (the verified stages).
FLOAT32 = "float32"
INT8 = "int8"
PRECISIONS = (FLOAT32, INT8)


@dataclass(frozen=True)
class StageVariant:
    """The same stages in another precision: same inputs and outputs (float32 at every stage
    boundary), other files; ``accuracy`` is how close they came to the float model."""

    files: dict[str, str]  # stage ("head", "tail" or "whole") -> archive path
    accuracy: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"files": dict(self.files), "accuracy": self.accuracy}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageVariant:
        files = _req(data, "files", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise ManifestError("manifest field 'files' of a stage variant must map names to paths")
        return cls(files=dict(files), accuracy=dict(data.get("accuracy") or {}))


def _variants(data: Any) -> dict[str, StageVariant]:
    if not isinstance(data, dict):
        raise ManifestError("manifest field 'variants' must be an object")
    unknown = sorted(set(data) - set(PRECISIONS[1:]))
    if unknown:
        raise ManifestError(f"unknown precision(s) {unknown} in the manifest (known: {list(PRECISIONS)})")
    return {precision: StageVariant.from_json(v) for precision, v in data.items()}


@dataclass(frozen=True)
class Partition:
    """One head/tail split of the model, as cut offline for one requested ratio."""

    ratio: float  # requested share of the cost in the head
    achieved_ratio: float
    method: str
    head: str  # archive-relative paths
    tail: str
    cut_tensors: tuple[TensorSpec, ...]
    cut_bytes_per_sample: int
    head_cost: float
    tail_cost: float
    max_abs_err: float
    head_outputs: tuple[str, ...] = ()  # model outputs the head produces itself
    # Other precisions of this head and tail (hetserve archive --quantize int8).
    variants: dict[str, StageVariant] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["cut_tensors"] = [t.to_json() for t in self.cut_tensors]
        out["head_outputs"] = list(self.head_outputs)
        out.pop("variants")
        if self.variants:
            out["variants"] = {k: v.to_json() for k, v in sorted(self.variants.items())}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Partition:
        return cls(
            ratio=float(_req(data, "ratio", (int, float))),
            achieved_ratio=float(_req(data, "achieved_ratio", (int, float))),
            method=_req(data, "method", str),
            head=_req(data, "head", str),
            tail=_req(data, "tail", str),
            cut_tensors=tuple(TensorSpec.from_json(t) for t in _req(data, "cut_tensors", list)),
            cut_bytes_per_sample=int(_req(data, "cut_bytes_per_sample", int)),
            head_cost=float(_req(data, "head_cost", (int, float))),
            tail_cost=float(_req(data, "tail_cost", (int, float))),
            max_abs_err=float(_req(data, "max_abs_err", (int, float))),
            head_outputs=tuple(data.get("head_outputs", ())),
            variants=_variants(data.get("variants") or {}),
        )


@dataclass(frozen=True)
class Manifest:
    model_name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    whole_model: str
    partitions: tuple[Partition, ...]
    files: dict[str, FileEntry]
    default_ratio: float | None = None
    profile: dict[str, Any] = field(default_factory=dict)
    producer: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION
    # Dynamic dims beyond the batch (handlers.protocol.dynamic_dims.DynamicDims.to_json): empty = none.
    dynamic_dims: dict[str, Any] = field(default_factory=dict)
    # Other precisions of the whole model; every partition has the same ones (partitioner/quantize.py).
    whole_variants: dict[str, StageVariant] = field(default_factory=dict)
    # How the other precisions were made and checked: method, calibration, threshold.
    quantization: dict[str, Any] = field(default_factory=dict)

    @property
    def precisions(self) -> tuple[str, ...]:
        return (FLOAT32, *sorted(self.whole_variants))

    def stage_files(self, partition: Partition | None, precision: str = FLOAT32) -> dict[str, str]:
        """Stage name -> archive file for ``partition`` (None: the whole model) in ``precision``."""
        if precision == FLOAT32:
            if partition is None:
                return {"whole": self.whole_model}
            return {"head": partition.head, "tail": partition.tail}
        variants = self.whole_variants if partition is None else partition.variants
        if precision not in variants:
            what = "whole model" if partition is None else f"partition for ratio {partition.ratio:g}"
            raise ManifestError(
                f"this archive has no {precision} stages for its {what} (archived precisions: "
                f"{', '.join(self.precisions)}); rebuild it with hetserve archive --quantize {precision}"
            )
        return dict(variants[precision].files)

    def partition_for(self, ratio: float | None) -> Partition | None:
        """The partition for ``ratio`` (``None``: the default one; no partitions: ``None``): the
        one cut for it, else the one whose achieved ratio is nearest (logged)."""
        if ratio is None:
            ratio = self.default_ratio
        if ratio is None or ratio >= WHOLE_MODEL:
            return None
        for part in self.partitions:
            if abs(part.ratio - ratio) < 1e-9:
                return part
        if not self.partitions:
            raise ManifestError(f"no partition for ratio {ratio:g}: the archive has none")
        nearest = min(self.partitions, key=lambda p: (abs(p.achieved_ratio - ratio), p.ratio))
        _log.info(
            "ratio %g is not archived; serving the nearest partition, achieved ratio %.3f "
            "(archived: %s)", ratio, nearest.achieved_ratio,
            ", ".join(f"{p.achieved_ratio:.3f}" for p in self.partitions),
        )
        return nearest

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "model_name": self.model_name,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "whole_model": self.whole_model,
            "default_ratio": self.default_ratio,
            "partitions": [p.to_json() for p in self.partitions],
            "profile": self.profile,
            "producer": self.producer,
            **({"dynamic_dims": self.dynamic_dims} if self.dynamic_dims else {}),
            **({"whole_variants": {k: v.to_json() for k, v in sorted(self.whole_variants.items())}}
               if self.whole_variants else {}),
            **({"quantization": self.quantization} if self.quantization else {}),
            "files": {p: {"sha256": e.sha256, "size": e.size} for p, e in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ManifestError("not a hetserve manifest (missing format marker)")
        version = data.get("version")
        if version != MANIFEST_VERSION:
            raise ManifestError(
                f"manifest version {version!r} is not supported (this handler reads {MANIFEST_VERSION})"
            )
        files = {}
        for path, entry in _req(data, "files", dict).items():
            check_relative_path(path)
            files[path] = FileEntry(
                sha256=_req(entry, "sha256", str), size=int(_req(entry, "size", int))
            )
        manifest = cls(
            model_name=_req(data, "model_name", str),
            inputs=tuple(TensorSpec.from_json(t) for t in _req(data, "inputs", list)),
            outputs=tuple(TensorSpec.from_json(t) for t in _req(data, "outputs", list)),
            whole_model=_req(data, "whole_model", str),
            partitions=tuple(Partition.from_json(p) for p in data.get("partitions", [])),
            files=files,
            default_ratio=_optional_ratio(data.get("default_ratio")),
            profile=data.get("profile", {}),
            producer=data.get("producer", {}),
            version=version,
            dynamic_dims=data.get("dynamic_dims") or {},
            whole_variants=_variants(data.get("whole_variants") or {}),
            quantization=data.get("quantization") or {},
        )
        for precision, variant in manifest.whole_variants.items():
            _check_stages(variant, {"whole"}, f"the whole model's {precision} variant")
        for part in manifest.partitions:
            for precision, variant in part.variants.items():
                _check_stages(variant, {"head", "tail"}, f"ratio {part.ratio:g}'s {precision} variant")
            if set(part.variants) != set(manifest.whole_variants):
                raise ManifestError(
                    f"the partition for ratio {part.ratio:g} has precisions {sorted(part.variants)}, "
                    f"the whole model {sorted(manifest.whole_variants)}"
                )
        for path in manifest.referenced_files():
            if path not in files:
                raise ManifestError(f"manifest refers to {path!r} but does not list its hash")
        return manifest

    def referenced_files(self) -> list[str]:
        paths = [self.whole_model]
        for part in self.partitions:
            paths += [part.head, part.tail]
            paths += [f for v in part.variants.values() for f in v.files.values()]
        paths += [f for v in self.whole_variants.values() for f in v.files.values()]
        return paths


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_relative_path(path: str) -> PurePosixPath:
    """Refuse archive paths that could point outside the model directory."""
    pure = PurePosixPath(path)
    if (
        not path
        or pure.is_absolute()
        or "\\" in path
        or ".." in pure.parts
        or path.startswith("~")
        or not path.isprintable()
    ):
        raise ManifestError(f"unsafe path in manifest: {path[:80]!r}")
    return pure


def resolve_inside(model_dir: str | os.PathLike[str], path: str) -> Path:
    """The real path of an archive file, refusing links and anything outside ``model_dir``."""
    check_relative_path(path)
    root = Path(model_dir).resolve()
    candidate = root / path
    # Walk every component: a symlinked directory is as dangerous as a symlinked file.
    current = root
    for part in PurePosixPath(path).parts:
        current = current / part
        if current.is_symlink():
            raise ManifestError(f"{path!r} is a symbolic link; archives may not contain links")
    resolved = candidate.resolve()
    if root not in resolved.parents:
        raise ManifestError(f"{path!r} resolves outside the model directory")
    return resolved


def verify_files(manifest: Manifest, model_dir: str | os.PathLike[str]) -> None:
    """Check every listed file's presence, type, size and SHA-256; raise on the first problem."""
    for path, entry in sorted(manifest.files.items()):
        real = resolve_inside(model_dir, path)
        if not real.is_file():
            raise ManifestError(f"{path!r} is listed in the manifest but missing from the archive")
        size = real.stat().st_size
        if size != entry.size:
            raise ManifestError(f"{path!r} has {size} bytes, the manifest says {entry.size}")
        digest = sha256_file(real)
        if digest != entry.sha256:
            raise ManifestError(f"{path!r} does not match its SHA-256 in the manifest")


def verify_no_strays(manifest: Manifest, model_dir: str | os.PathLike[str]) -> None:
    """Refuse links anywhere in the model directory and files nobody vouches for.

    An archive entry with an absolute name lands inside TorchServe's extraction directory
    (``/etc/x`` becomes ``etc/x``) and a link entry becomes a plain file or, with other
    extractors, a real link: either way the archive is not the one the manifest describes.
    """
    root = Path(model_dir)
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        for name in [*dirs, *names]:
            rel = (here / name).relative_to(root).as_posix()
            if (here / name).is_symlink():
                raise ManifestError(f"{rel[:80]!r} is a symbolic link; archives may not contain links")
            if name in names and not _vouched_for(rel, manifest) and rel in COVERED_SINCE_V17:
                raise ManifestError(
                    f"{rel!r} is not covered by the manifest: the archive was built before "
                    "hetserve listed its entry handler and config; rebuild it with hetserve archive"
                )
            if name in names and not _vouched_for(rel, manifest):
                raise ManifestError(
                    f"unexpected file {rel[:80]!r} in the model directory (not in the manifest)"
                )


def _vouched_for(rel: str, manifest: Manifest) -> bool:
    parts = PurePosixPath(rel).parts
    # Python caches the handler's bytecode next to it once TorchServe imports it.
    compiled = "__pycache__" in parts and rel.endswith(".pyc")
    return rel in manifest.files or rel in PACKAGING_FILES or compiled


def verify_onnx_files(manifest: Manifest, model_dir: str | os.PathLike[str]) -> None:
    """Refuse any ONNX file whose tensors would make ORT read outside the verified files.

    Call after ``verify_files``: the sizes it checked bound every external-data range.
    """
    sizes = {path: entry.size for path, entry in manifest.files.items()}
    onnx_files = set(manifest.referenced_files()) | {p for p in sizes if p.endswith(".onnx")}
    for path in sorted(onnx_files):
        try:
            check_external_data(path, external_refs(resolve_inside(model_dir, path)), sizes)
        except UnsafeModelError as exc:
            raise ManifestError(f"{path!r} is refused: {exc}") from None


def read_manifest(model_dir: str | os.PathLike[str]) -> Manifest:
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file() or path.is_symlink():
        raise ManifestError(f"{MANIFEST_NAME} is missing from the archive")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"{MANIFEST_NAME} is not valid JSON: {_one_line(exc)}") from None
    try:
        return Manifest.from_json(data)
    except ManifestError as exc:
        raise ManifestError(f"{MANIFEST_NAME}: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        # A field of the wrong shape deep inside (a shape entry that is not a number, say).
        raise ManifestError(f"{MANIFEST_NAME} is malformed: {_one_line(exc)}") from None


def load_verified_manifest(model_dir: str | os.PathLike[str]) -> Manifest:
    """The manifest, once every file it lists and every ONNX file's external data are safe."""
    manifest = read_manifest(model_dir)
    verify_files(manifest, model_dir)
    verify_no_strays(manifest, model_dir)
    verify_onnx_files(manifest, model_dir)
    return manifest


def write_manifest(manifest: Manifest, model_dir: str | os.PathLike[str]) -> Path:
    path = Path(model_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


def _check_stages(variant: StageVariant, stages: set[str], what: str) -> None:
    if set(variant.files) != stages:
        raise ManifestError(f"{what} names stages {sorted(variant.files)}, expected {sorted(stages)}")
    for path in variant.files.values():
        check_relative_path(path)


def _optional_ratio(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ManifestError("manifest field 'default_ratio' has the wrong type")
    return float(value)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _req(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise ManifestError(f"manifest field {key!r} is missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ManifestError(f"manifest field {key!r} has the wrong type")
    return value


def serves_split(
    ratio: float | None, default_ratio: float | None, cpu_cores: int | None = None
) -> bool:
    """Head + tail (else the whole model): the configured ``ratio``, or the archive's
    ``default_ratio`` when it is None, below 1.0 (the rule ``Manifest.partition_for`` applies).
    A CPU-only worker with one core (``cpu_cores``) serves the archive's default whole: head and
    tail would take turns on that one core; an explicit ratio is still honoured."""
    if ratio is None and cpu_cores is not None and cpu_cores < 2:
        return False
    effective = default_ratio if ratio is None else ratio
    return effective is not None and effective < WHOLE_MODEL
