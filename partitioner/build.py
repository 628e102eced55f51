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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

from handlers.artifact.example_inputs import example_feeds
from handlers.artifact.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    Partition,
    sha256_file,
    write_manifest,
)
from handlers.protocol.dynamic_dims import DynamicDims
from partitioner.cuts import DEFAULT_TOLERANCE, CutResult, find_cut
from partitioner.graph import evaluate
from partitioner.onnx_graph import OnnxTaskGraph, build_task_graph
from partitioner.split_ops import OpSplit, split_costs, split_node, splittable_weight
from partitioner.stages import (
    VERIFY_TOLERANCE,
    WEIGHTS_FILE,
    SharedWeights,
    StageError,
    graph_io_specs,
    run_pipeline,
    save_model,
    split_model,
    tensor_spec,
)
from partitioner.verify import (
    ATOL_OF_SCALE,
    RTOL,
    check_evidence,
    compare,
    other_sizes,
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
    max_abs_err: float = VERIFY_TOLERANCE  # stages vs the whole ONNX graph, absolute
    seed: int = 0
    allow_off_target: bool = False  # keep a cut that misses its ratio's window (labelled honestly)

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
    """Files are named by the ratio the cut achieved (not the one asked for)."""
    # Flat: ORT resolves external data next to the graph file and refuses paths that leave it.
    base = f"stage-r{ratio:.3f}"
    return f"{base}-{method}" if several_methods else base


class OffTargetError(StageError):
    """A requested ratio has no cut inside its window; --allow-off-target keeps the nearest."""


@dataclass(frozen=True)
class Evidence:
    """Verification cases: inputs drawn per dtype and range, at the representative dynamic
    sizes and one other, with the reference outputs (torch when given, else the whole ONNX)."""

    cases: tuple[tuple[dict[str, Any], dict[str, Any]], ...]
    scales: dict[str, float]
    reference: str  # "torch" or "onnx"
    onnx_vs_torch: float  # worst relative-tolerance ratio of the whole ONNX against torch


def gather_evidence(
    model: onnx.ModelProto,
    whole_session,
    inputs,
    options: CutOptions,
    dynamic: DynamicDims,
    reference: Callable[[dict[str, Any]], dict[str, Any]] | None,
    source: str,
) -> Evidence:
    import numpy as np

    settings = [dict(dynamic.sizes)]
    if dynamic.sizes:
        settings.append(other_sizes(dynamic.sizes, dynamic.bounds))
    rng = np.random.default_rng(options.seed)
    names = [o.name for o in whole_session.get_outputs()]
    cases, scales, worst = [], {}, 0.0
    for sizes in settings:
        for batch in options.verify_batches:
            feeds = example_feeds(inputs, batch, rng, sizes, dynamic.axes)
            whole = dict(zip(names, whole_session.run(None, feeds), strict=True))
            if reference is not None:
                expected = reference(feeds)
                for name in names:
                    worst = max(worst, compare(whole[name], expected[name]).worst)
            else:
                expected = whole
            for name, scale in check_evidence(expected, source).items():
                scales[name] = max(scales.get(name, 0.0), scale)
            cases.append((feeds, expected))
    if worst > 1.0:
        raise StageError(
            f"{source}: the exported ONNX graph differs from torch beyond rtol {RTOL:g} + "
            f"atol {ATOL_OF_SCALE:g} x scale (worst element at {worst:.3g}x the tolerance); "
            "the export is wrong, not the cut"
        )
    return Evidence(tuple(cases), scales, "torch" if reference else "onnx", worst)


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
    dynamic: DynamicDims | None = None,
    reference: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> BuildResult:
    """Cut ``model`` at each ratio, write and verify the stages, write the manifest.

    ``reference`` (torch's forward on numpy feeds) is what the stages must reproduce; without
    it, the whole ONNX graph. ``dynamic`` prices cut bytes at the representative sizes and
    verifies there and at one other size.
    """
    from tqdm import tqdm

    dynamic = dynamic or DynamicDims()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_cuts(model, costs, options, dynamic)
    model, task, op_split = plan.model, plan.task, plan.split
    split_note = (
        f"split {op_split.node} ({op_split.op_type}, {op_split.columns} output columns) into "
        f"{op_split.parts} parts to reach the ratio"
        if op_split is not None else ""
    )
    # Before anything is written or verified: an unreachable ratio fails in seconds.
    for (ratio, _), cut in plan.cuts.items():
        if not cut.within_tolerance and not options.allow_off_target:
            raise OffTargetError(
                f"ratio {ratio:g} is unreachable within +-{options.tolerance:g} "
                f"({cut.method}): the nearest cut found gives the head "
                f"{cut.achieved_ratio:.3f} of the cost ({cut.note}). Ask for ratios near "
                "what the model allows, widen --tolerance, or pass --allow-off-target to "
                "keep the nearest cut, labelled with the ratio it achieves."
            )
    inputs, outputs = graph_io_specs(model)
    several = len(options.methods) > 1

    partitions: list[Partition] = []
    rows: list[ReportRow] = []
    written: dict[tuple[str, float], Partition] = {}
    with SharedWeights(out_dir) as weights:
        save_model(weights.externalize(model), out_dir / WHOLE_MODEL_FILE)
        weights.flush()
        whole_session = _cpu_session(out_dir / WHOLE_MODEL_FILE)
        evidence = gather_evidence(
            model, whole_session, inputs, options, dynamic, reference, model_name
        )
        jobs = [(r, m) for r in options.ratios for m in options.methods]
        for ratio, method in tqdm(jobs, desc="cut+verify", unit="cut", disable=not progress):
            started = time.perf_counter()
            cut = plan.cuts[(ratio, method)]
            # Two requested ratios, one cut (or two cuts of the same cost split, e.g. a free
            # Reshape on either side): archived once.
            key = (method, round(cut.achieved_ratio, 9))
            if key in written:
                partition, err = written[key], written[key].max_abs_err
            else:
                prefix = stage_prefix(cut.achieved_ratio, method, several)
                taken = {p.head for p in partitions}
                suffix = 1
                while f"{prefix}-head.onnx" in taken:  # ratios equal to 3 decimals
                    suffix += 1
                    prefix = f"{stage_prefix(cut.achieved_ratio, method, several)}-{suffix}"
                partition, err = _write_and_verify(
                    model, task, cut, out_dir, prefix, weights, options, whole_session,
                    evidence,
                )
                written[key] = partition
                partitions.append(partition)
            rows.append(_report_row(cut, err, time.perf_counter() - started, split_note))

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
        producer={
            **dict(producer or {}),
            "verification": {
                "reference": evidence.reference,
                "output_scale": evidence.scales,
                "onnx_vs_torch_worst": evidence.onnx_vs_torch,
                "cases": len(evidence.cases),
            },
            **({"split_ops": [asdict(op_split)]} if op_split is not None else {}),
        },
        dynamic_dims=dynamic.to_json() if dynamic else {},
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
    options: CutOptions,
    whole_session,
    evidence: Evidence,
) -> tuple[Partition, float]:
    pair = split_model(model, task, cut.tail)
    head_path = f"{prefix}-head.onnx"
    tail_path = f"{prefix}-tail.onnx"
    save_model(weights.externalize(pair.head), out_dir / head_path)
    save_model(weights.externalize(pair.tail), out_dir / tail_path)
    weights.flush()
    err, worst = verify_against(
        out_dir / head_path, out_dir / tail_path, evidence.cases, whole_session
    )
    if worst > 1.0 or not err <= max(options.max_abs_err, 0.0) + _scaled_slack(evidence):
        raise StageError(
            f"ratio {cut.target_ratio:g} ({cut.method}): head -> tail differs from the "
            f"{evidence.reference} reference by {err:.3g} (worst element {worst:.3g}x the "
            f"tolerance rtol {RTOL:g} + atol {ATOL_OF_SCALE:g} x output scale)"
        )
    stats = evaluate(task.graph, cut.tail)
    ranged = {spec.name: spec for spec in graph_io_specs(model)[0]}
    # Off target: labelled with what it achieves (below 1.0, which means "the whole model").
    label = cut.target_ratio if cut.within_tolerance else min(round(cut.achieved_ratio, 3), 0.999)
    partition = Partition(
        ratio=label,
        achieved_ratio=stats.head_ratio,
        method=cut.method,
        head=head_path,
        tail=tail_path,
        # A model input the tail reads keeps its value range: the runtime probes stages with it.
        cut_tensors=tuple(ranged.get(name) or tensor_spec(model, name) for name in pair.cut_tensors),
        cut_bytes_per_sample=stats.cut_bytes,
        head_cost=stats.head_cost,
        tail_cost=stats.tail_cost,
        max_abs_err=err,
        head_outputs=pair.head_outputs,
    )
    return partition, err


SPLIT_PARTS = (2, 3, 4, 6, 8, 12, 16)


@dataclass(frozen=True)
class CutPlan:
    """The model to cut (maybe with one op split), its task graph and the cuts already found."""

    model: onnx.ModelProto
    costs: Mapping[str, float]
    task: OnnxTaskGraph
    cuts: dict[tuple[float, str], CutResult]
    split: OpSplit | None = None


def _cuts(task: OnnxTaskGraph, ratios, options: CutOptions) -> dict[tuple[float, str], CutResult]:
    return {
        (r, m): find_cut(
            task.graph, r, method=m, tolerance=options.tolerance,
            time_limit=options.time_limit, seed=options.seed,
        )
        for r in ratios for m in options.methods
    }


def _missed(cuts: Mapping[tuple[float, str], CutResult]) -> set[float]:
    return {r for (r, _), c in cuts.items() if not c.within_tolerance}


def plan_cuts(
    model: onnx.ModelProto, costs: Mapping[str, float], options: CutOptions, dynamic: DynamicDims
) -> CutPlan:
    """Cut at every ratio; when some ratio is unreachable because one MatMul/Gemm is heavier than
    the window, split that op into column chunks (the fewest parts that reach the most ratios,
    and only if that reaches at least one more). One split serves every ratio: the stages are
    subgraphs of one whole model."""
    task = build_task_graph(model, costs, dynamic.sizes)
    plan = CutPlan(model, costs, task, _cuts(task, options.ratios, options))
    unreachable = _missed(plan.cuts)
    if not unreachable:
        return plan
    window = 2 * options.tolerance * task.graph.total_cost
    heavy = []
    for node in model.graph.node:
        weight = splittable_weight(model, node) if costs.get(node.name, 0.0) > window else None
        if weight is not None:
            heavy.append((-costs[node.name], node.name, weight.shape[1]))
    best, best_reached = plan, 0
    for _, name, columns in sorted(heavy):
        for parts in (p for p in SPLIT_PARTS if p <= columns):
            split_model_, split = split_node(model, name, parts)
            split_costs_ = split_costs(costs, split)
            split_task = build_task_graph(split_model_, split_costs_, dynamic.sizes)
            cuts = _cuts(split_task, options.ratios, options)
            reached = len(unreachable - _missed(cuts))
            if reached > best_reached and not _missed(cuts) - unreachable:
                best = CutPlan(split_model_, split_costs_, split_task, cuts, split)
                best_reached = reached
            if reached == len(unreachable):
                return best
    return best


def check_loads(stage_dir: Path, config: Mapping[str, Any], manifest: Manifest) -> None:
    """Load every archived partition with the handler's own code (manifest check, executors,
    calibration with real head outputs) and serve one request through it, as TorchServe will:
    a ``.mar`` that ``archive`` writes always loads."""
    import os
    import tempfile

    import numpy as np

    from handlers.artifact.state_dir import user_cache_root
    from handlers.service import InferenceService

    rng = np.random.default_rng(0)
    # The check's history is thrown away, but it must live where a worker may write one.
    cache = user_cache_root(os.environ, Path.home())
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hetserve-loadcheck-", dir=cache) as state:
        for precision, part in ((p, q) for p in manifest.precisions for q in manifest.partitions or (None,)):
            ratio = part.ratio if part is not None else 1.0
            section = {**dict(config.get("hetserve") or {}), "ratio": ratio, "state_dir": state,
                       "precision": precision}
            section.pop("faults", None)  # test-only injected failures are not the archive's
            try:
                service = InferenceService.load(stage_dir, {**dict(config), "hetserve": section})
            except Exception as exc:
                raise StageError(
                    f"the handler cannot load the {precision} partition for ratio {ratio:g}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            try:
                feeds = example_feeds(manifest.inputs, 2, rng)
                service.runtime.infer(feeds)
            except Exception as exc:
                raise StageError(
                    f"the handler loads ratio {ratio:g} ({precision}) but fails to serve it: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            finally:
                service.close()


def _scaled_slack(evidence: Evidence) -> float:
    # The absolute limit grows with the outputs' magnitude (logits in the hundreds): the
    # relative test above is the real one.
    return ATOL_OF_SCALE * max(evidence.scales.values(), default=0.0)


def verify_against(head_path: Path, tail_path: Path, cases, whole_session) -> tuple[float, float]:
    """Run head -> tail on every case; (max abs error, worst tolerance ratio) vs the reference."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    head = ort.InferenceSession(str(head_path), providers=providers)
    tail = ort.InferenceSession(str(tail_path), providers=providers)
    err, worst = 0.0, 0.0
    for feeds, expected in cases:
        produced = run_pipeline(head, tail, feeds)
        for name, want in expected.items():
            result = compare(produced[name], want)
            if result.worst == float("inf"):
                raise StageError(
                    f"output {name!r}: shape {produced[name].shape} from the stages, "
                    f"{want.shape} expected"
                )
            err, worst = max(err, result.max_abs_err), max(worst, result.worst)
    return err, worst


def _report_row(cut: CutResult, err: float, seconds: float, extra_note: str = "") -> ReportRow:
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
        note="; ".join(filter(None, [extra_note, cut.note])),
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
