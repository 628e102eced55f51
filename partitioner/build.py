"""From an exported model and its node costs to a directory of verified stages plus a manifest.

Layout of the directory (the payload of the ``.mar``)::

    model.onnx                      the whole model (graph only)
    weights.bin                     every large initializer, once, shared through ONNX external data
    stage-r0.80-head.onnx ...       one head/tail pair per requested ratio (flat: see stage_prefix)
    profile.json                    the per-node costs the cut was computed from
    hetserve-manifest.json          shapes, cuts, predicted costs and the SHA-256 of every file
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

from handlers.artifact.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    Partition,
    sha256_file,
    write_manifest,
)
from partitioner.cuts import DEFAULT_TOLERANCE, CutResult, find_cut
from partitioner.graph import evaluate
from partitioner.onnx_graph import OnnxTaskGraph, build_task_graph
from partitioner.stages import (
    VERIFY_TOLERANCE,
    WEIGHTS_FILE,
    SharedWeights,
    StageError,
    graph_io_specs,
    save_model,
    split_model,
    tensor_spec,
    verify_stages,
)

DEFAULT_RATIOS = (0.75, 0.80, 0.85, 0.90)
WHOLE_MODEL_FILE = "model.onnx"
PROFILE_FILE = "profile.json"


@dataclass(frozen=True)
class CutOptions:
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    methods: tuple[str, ...] = ("metis",)
    tolerance: float = DEFAULT_TOLERANCE
    time_limit: float = 10.0
    verify_batches: tuple[int, ...] = (1, 4)
    max_abs_err: float = VERIFY_TOLERANCE
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.ratios:
            raise ValueError("at least one ratio is needed")
        for r in self.ratios:
            if not 0.0 < r < 1.0:
                raise ValueError(f"ratio {r} must be strictly between 0 and 1")
        if not 0.0 <= self.tolerance < 0.5:
            raise ValueError("tolerance must be in [0, 0.5)")


@dataclass(frozen=True)
class ReportRow:
    """One line of ``hetserve partition --report``."""

    method: str
    ratio: float
    achieved_ratio: float
    cut_bytes: int
    valid: bool
    within_tolerance: bool
    optimal: bool | None
    max_abs_err: float
    seconds: float
    cut_seconds: float
    note: str = ""


@dataclass(frozen=True)
class BuildResult:
    directory: Path
    manifest: Manifest
    rows: tuple[ReportRow, ...]


def stage_prefix(ratio: float, method: str, several_methods: bool) -> str:
    # Flat: ORT resolves external data next to the graph file and refuses paths that leave it.
    base = f"stage-r{ratio:.2f}"
    return f"{base}-{method}" if several_methods else base


def build_stage_directory(
    model: onnx.ModelProto,
    costs: Mapping[str, float],
    out_dir: Path,
    model_name: str,
    options: CutOptions,
    profile_record: Mapping[str, Any] | None = None,
    default_ratio: float | None = None,
    progress: bool = True,
    producer: Mapping[str, Any] | None = None,
) -> BuildResult:
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    task = build_task_graph(model, costs)
    inputs, outputs = graph_io_specs(model)
    several = len(options.methods) > 1

    partitions: list[Partition] = []
    rows: list[ReportRow] = []
    with SharedWeights(out_dir) as weights:
        save_model(weights.externalize(model), out_dir / WHOLE_MODEL_FILE)
        weights.flush()
        whole_session = _cpu_session(out_dir / WHOLE_MODEL_FILE)
        jobs = [(r, m) for r in options.ratios for m in options.methods]
        for ratio, method in tqdm(jobs, desc="cut+verify", unit="cut", disable=not progress):
            started = time.perf_counter()
            cut = find_cut(
                task.graph, ratio, method=method, tolerance=options.tolerance,
                time_limit=options.time_limit, seed=options.seed,
            )
            prefix = stage_prefix(ratio, method, several)
            partition, err = _write_and_verify(
                model, task, cut, out_dir, prefix, weights, inputs, options, whole_session
            )
            partitions.append(partition)
            rows.append(_report_row(cut, err, time.perf_counter() - started))

    (out_dir / PROFILE_FILE).write_text(json.dumps(dict(profile_record or {}), indent=1) + "\n")
    files = _hash_files(out_dir)
    default = default_ratio if default_ratio is not None else _pick_default(options.ratios)
    manifest = Manifest(
        model_name=model_name,
        inputs=inputs,
        outputs=outputs,
        whole_model=WHOLE_MODEL_FILE,
        partitions=tuple(partitions) if not several else tuple(
            p for p in partitions if p.method == options.methods[0]
        ),
        files=files,
        default_ratio=default,
        profile={
            "path": PROFILE_FILE,
            **{k: v for k, v in (profile_record or {}).items() if k != "costs"},
        },
        producer=dict(producer or {}),
    )
    write_manifest(manifest, out_dir)
    return BuildResult(directory=out_dir, manifest=manifest, rows=tuple(rows))


def _write_and_verify(
    model: onnx.ModelProto,
    task: OnnxTaskGraph,
    cut: CutResult,
    out_dir: Path,
    prefix: str,
    weights: SharedWeights,
    inputs,
    options: CutOptions,
    whole_session,
) -> tuple[Partition, float]:
    pair = split_model(model, task, cut.tail)
    head_path = f"{prefix}-head.onnx"
    tail_path = f"{prefix}-tail.onnx"
    save_model(weights.externalize(pair.head), out_dir / head_path)
    save_model(weights.externalize(pair.tail), out_dir / tail_path)
    weights.flush()
    err = verify_stages(
        out_dir / WHOLE_MODEL_FILE, out_dir / head_path, out_dir / tail_path, inputs,
        batches=options.verify_batches, seed=options.seed, whole_session=whole_session,
    )
    if not err <= options.max_abs_err:
        raise StageError(
            f"ratio {cut.target_ratio:g} ({cut.method}): head -> tail differs from the whole model "
            f"by {err:.3g} (limit {options.max_abs_err:g})"
        )
    stats = evaluate(task.graph, cut.tail)
    partition = Partition(
        ratio=cut.target_ratio,
        achieved_ratio=stats.head_ratio,
        method=cut.method,
        head=head_path,
        tail=tail_path,
        cut_tensors=tuple(tensor_spec(model, name) for name in pair.cut_tensors),
        cut_bytes_per_sample=stats.cut_bytes,
        head_cost=stats.head_cost,
        tail_cost=stats.tail_cost,
        max_abs_err=err,
        head_outputs=pair.head_outputs,
    )
    return partition, err


def _report_row(cut: CutResult, err: float, seconds: float) -> ReportRow:
    return ReportRow(
        method=cut.method,
        ratio=cut.target_ratio,
        achieved_ratio=round(cut.achieved_ratio, 4),
        cut_bytes=cut.cut_bytes,
        valid=cut.valid,
        within_tolerance=cut.within_tolerance,
        optimal=cut.optimal,
        max_abs_err=err,
        seconds=round(seconds, 3),
        cut_seconds=round(cut.seconds, 3),
        note=cut.note,
    )


def _cpu_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _hash_files(out_dir: Path) -> dict[str, FileEntry]:
    files = {}
    for path in sorted(out_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            rel = path.relative_to(out_dir).as_posix()
            files[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    return files


def _pick_default(ratios: Sequence[float]) -> float:
    # The paper's best trade-off was usually 80/20; otherwise the closest requested ratio.
    return min(ratios, key=lambda r: abs(r - 0.8))


def rows_to_json(rows: Sequence[ReportRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


__all__ = [
    "BuildResult",
    "CutOptions",
    "DEFAULT_RATIOS",
    "ReportRow",
    "WEIGHTS_FILE",
    "build_stage_directory",
    "rows_to_json",
]
