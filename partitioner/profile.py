"""What each node of the graph costs: measured by ONNX Runtime's profiler, or estimated in FLOPs.

Measuring runs the whole graph in one session with profiling on and reads the per-node kernel
times from the trace ORT writes; timing nodes one at a time would miss cache effects and the
overlap the real run has. ``flops_costs`` is the static fallback (``--cost flops``) for when the
target device is not at hand.

Robustness on a shared machine: the measured runs are split into ``passes`` consecutive blocks;
each node's figure is the median over its block, and its cost the median of the blocks' figures.
A busy spell that covers one block (another build, a test server starting) is outvoted by the
others instead of deciding the cut. The measured shares are then cross-checked against the FLOP
estimate and nodes far off it are reported (``flop_mismatches``), never silently replaced: a
memory-bound op really can cost more than its FLOPs say, but a 10x disagreement usually means a
preempted block or a mis-attributed kernel, and the user should see which node it was.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from handlers.artifact.example_inputs import draw
from partitioner.value_ranges import derive_ranges

log = logging.getLogger(__name__)

_KERNEL_SUFFIX = "_kernel_time"
DEFAULT_PASSES = 3
# Cross-check thresholds: a node is reported when its measured share of the total and its FLOP
# share differ by more than this factor, and the larger of the two is at least MISMATCH_MIN_SHARE
# (below that, launch overheads of tiny ops dominate and every small op would be "off").
MISMATCH_FACTOR = 10.0
MISMATCH_MIN_SHARE = 0.05
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ProfileError(ValueError):
    """Profiling could not run as asked (no GPU, unnamed nodes...); the message says why."""


@dataclass(frozen=True)
class CostMismatch:
    """A node whose measured share of the total is far from its share of the FLOPs."""

    node: str
    op_type: str
    measured_share: float
    flop_share: float


@dataclass(frozen=True)
class NodeProfile:
    # node name -> µs per run at ``batch`` (median of the passes' medians); 0 if never reported
    costs: dict[str, float]
    device: str
    provider: str
    batch: int
    runs: int  # measured runs per pass
    seconds: float  # wall time of the measured runs, all together
    unmatched: list[str] = field(default_factory=list)  # profiled names that are no graph node
    passes: int = 1
    pass_totals_us: list[float] = field(default_factory=list)  # sum of node medians per pass
    flop_mismatches: list[CostMismatch] = field(default_factory=list)

    @property
    def total_us(self) -> float:
        return float(sum(self.costs.values()))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeProfile:
        return cls(
            costs={str(k): float(v) for k, v in data["costs"].items()},
            device=str(data["device"]),
            provider=str(data["provider"]),
            batch=int(data["batch"]),
            runs=int(data["runs"]),
            seconds=float(data["seconds"]),
            unmatched=[str(u) for u in data.get("unmatched", [])],
            passes=int(data.get("passes", 1)),
            pass_totals_us=[float(t) for t in data.get("pass_totals_us", [])],
            flop_mismatches=[CostMismatch(**m) for m in data.get("flop_mismatches", [])],
        )


def profile_nodes(
    model: onnx.ModelProto,
    device: str = "cpu",
    batch: int = 1,
    runs: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    progress: bool = True,
    dim_sizes: dict[str, int] | None = None,
    passes: int = DEFAULT_PASSES,
) -> NodeProfile:
    """Per-node kernel time over ``passes`` blocks of ``runs`` whole-graph runs each, after
    ``warmup`` unmeasured ones: the median of the blocks' per-node medians.

    On CUDA the times ORT records are host-side: kernels launch asynchronously, so a node's time
    is its launch cost unless the kernel forces a sync. Use them as relative costs only.
    """
    import onnxruntime as ort
    from tqdm import tqdm

    if device not in _PROVIDERS:
        raise ValueError(f"device must be one of {sorted(_PROVIDERS)}, got {device!r}")
    if batch < 1 or runs < 1 or passes < 1 or warmup < 0:
        raise ValueError("batch, runs and passes must be at least 1, warmup at least 0")
    node_names = [n.name for n in model.graph.node]
    if not all(node_names) or len(set(node_names)) != len(node_names):
        raise ProfileError(
            "every node needs a unique non-empty name to be profiled; "
            "pass the model through partitioner.export first"
        )
    provider = _PROVIDERS[device]
    feeds = profile_feeds(model, batch, dim_sizes=dim_sizes)

    with tempfile.TemporaryDirectory(prefix="hetserve-profile-") as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "ort")
        # No graph optimisation: fused kernels (Conv+Relu, MatMul+Add...) would be reported
        # under the fused node's name and hide the ONNX nodes the cut is made of.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = list(dict.fromkeys([provider, "CPUExecutionProvider"]))
        session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        # onnxruntime-gpu lists CUDA as available without a GPU and silently falls back to CPU.
        if provider not in session.get_providers():
            session.end_profiling()
            raise ProfileError(
                f"{provider} could not be started (session has {session.get_providers()}); "
                "check that a CUDA GPU, its driver and onnxruntime-gpu's CUDA libraries are present"
            )
        def run() -> None:
            try:
                session.run(None, feeds)
            except Exception as exc:  # ORT raises its own types: one line for the user instead
                session.end_profiling()
                raise ProfileError(_failed_run(model, feeds, exc)) from exc

        measured = runs * passes
        bar = tqdm(total=warmup + measured, desc="profiling", unit="run", disable=not progress)
        with bar:
            for _ in range(warmup):
                run()
                bar.update()
            start = time.perf_counter()
            for _ in range(measured):
                run()
                bar.update()
            seconds = time.perf_counter() - start
        trace_path = session.end_profiling()
        with open(trace_path, encoding="utf-8") as f:
            events = json.load(f)

    per_pass, unmatched = _pass_medians(events, set(node_names), warmup, runs, passes)
    costs = {n: float(np.median(per_pass[n])) if n in per_pass else 0.0 for n in node_names}
    mismatches = _cross_check(model, costs, dim_sizes)
    if mismatches:
        worst = mismatches[0]
        log.warning(
            "profile: %d node(s) measured more than %gx off their share of the FLOPs, e.g. %s "
            "(%s) at %.1f%% of the time but %.1f%% of the FLOPs; kept as measured (listed in "
            "profile.json; tiny models are dominated by per-op overheads, otherwise re-profile "
            "on a quiet machine if the cut looks wrong)",
            len(mismatches), MISMATCH_FACTOR, worst.node, worst.op_type,
            100 * worst.measured_share, 100 * worst.flop_share,
        )
    return NodeProfile(
        costs=costs,
        device=device,
        provider=provider,
        batch=batch,
        runs=runs,
        seconds=seconds,
        unmatched=sorted(unmatched),
        passes=passes,
        pass_totals_us=[float(sum(m[k] for m in per_pass.values())) for k in range(passes)],
        flop_mismatches=mismatches,
    )


def flop_mismatches(
    model: onnx.ModelProto, measured: dict[str, float], flops: dict[str, float]
) -> list[CostMismatch]:
    """Nodes whose measured share and FLOP share differ by more than ``MISMATCH_FACTOR``
    (the larger share at least ``MISMATCH_MIN_SHARE``), largest disagreement first."""
    total_m, total_f = sum(measured.values()), sum(flops.values())
    if total_m <= 0 or total_f <= 0:
        return []
    ops = {n.name: n.op_type for n in model.graph.node}
    found = []
    for name, cost in measured.items():
        m_share, f_share = cost / total_m, flops.get(name, 0.0) / total_f
        if max(m_share, f_share) < MISMATCH_MIN_SHARE:
            continue
        if max(m_share, f_share) > MISMATCH_FACTOR * min(m_share, f_share):
            found.append(CostMismatch(name, ops.get(name, "?"), m_share, f_share))
    return sorted(found, key=lambda m: -abs(m.measured_share - m.flop_share))


def _cross_check(
    model: onnx.ModelProto, costs: dict[str, float], dim_sizes: dict[str, int] | None
) -> list[CostMismatch]:
    try:
        flops = flops_costs(model, dim_sizes)
    # Shape inference can fail on exotic graphs; the check is advisory, so it just stays off.
    except (onnx.shape_inference.InferenceError, ValueError, KeyError, TypeError) as exc:
        log.info("profile: no FLOP cross-check (%s: %s)", type(exc).__name__, exc)
        return []
    return flop_mismatches(model, costs, flops)


def profile_feeds(
    model: onnx.ModelProto, batch: int, seed: int = 0, dim_sizes: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Inputs for every graph input, each drawn from its value range (the graph's
    ``partitioner.value_ranges``, as the build records them); a dynamic dim beyond the batch
    takes its representative size from ``dim_sizes``."""
    rng = np.random.default_rng(seed)
    ranges = derive_ranges(model)
    weights = {i.name for i in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        shape = [
            batch if k == 0 else (dim_sizes or {}).get(d.dim_param) or _static_dim(value.name, d)
            for k, d in enumerate(tensor.shape.dim)
        ]
        feeds[value.name] = draw(dtype, shape, ranges.get(value.name), rng)
    return feeds


def _failed_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], exc: Exception) -> str:
    ranges = derive_ranges(model)
    drawn = "; ".join(
        f"{name} {array.dtype} {list(array.shape)}"
        + (f" in [{ranges[name].low:g}, {ranges[name].high:g})" if name in ranges else "")
        for name, array in feeds.items()
    )
    reason = " ".join(str(exc).split())[:300]
    return (
        f"ONNX Runtime cannot run the model on its profiling inputs ({drawn}): {reason}. "
        "Archive with --cost flops to skip measuring, and report the model: its inputs' "
        "valid values are read from the graph (partitioner/value_ranges.py)"
    )


def _static_dim(input_name: str, dim: onnx.TensorShapeProto.Dimension) -> int:
    if dim.HasField("dim_value"):
        return dim.dim_value
    raise ProfileError(
        f"input {input_name!r} has a dynamic dimension {dim.dim_param or '?'} besides the batch; "
        f"give its representative size for profiling, e.g. --dim {dim.dim_param or 'seq'}=128"
    )


def _kernel_times(
    events: Sequence[dict[str, Any]], node_names: set[str], warmup: int, runs: int, passes: int = 1
) -> tuple[dict[str, float], set[str]]:
    """Per node, the median of the passes' medians of its kernel time per run (µs)."""
    per_pass, unmatched = _pass_medians(events, node_names, warmup, runs, passes)
    return {name: float(np.median(m)) for name, m in per_pass.items()}, unmatched


def _pass_medians(
    events: Sequence[dict[str, Any]], node_names: set[str], warmup: int, runs: int, passes: int
) -> tuple[dict[str, list[float]], set[str]]:
    """Per node, for each pass (a block of ``runs`` consecutive measured runs), the median over
    that block of its kernel time in a run (µs).

    The median, not the mean: on a shared machine one preempted run can put milliseconds on
    a node that normally takes microseconds, and a mean of 5-10 runs would keep that spike.
    """
    total_runs = runs * passes
    # Every session.run leaves one "model_run" event; they split the trace into runs.
    run_starts = sorted(
        float(e["ts"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    if len(run_starts) != warmup + total_runs:
        raise ProfileError(
            f"the ONNX Runtime trace holds {len(run_starts)} runs, expected {warmup + total_runs}; "
            "it may have hit the profiler's event limit: profile with fewer runs"
        )
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * total_runs)
    unmatched: set[str] = set()
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith(_KERNEL_SUFFIX):
            continue
        run = bisect.bisect_right(run_starts, float(event.get("ts", 0))) - 1 - warmup
        if run < 0:
            continue  # a warm-up run
        name = event["name"][: -len(_KERNEL_SUFFIX)]
        if name in node_names:
            per_run[name][run] += float(event.get("dur", 0))
        else:
            unmatched.add(name)
    if not per_run:
        return {}, unmatched
    # Shares of each run's total, not raw times: a run slowed everywhere (the other core
    # busy, a frequency drop) changes no share, so only a node's own outliers remain, and the
    # medians remove those. The median run total of the pass turns shares back into µs.
    names = list(per_run)
    table = np.array([per_run[n] for n in names])  # nodes x runs
    run_totals = table.sum(axis=0)
    shares = table / np.where(run_totals > 0, run_totals, 1.0)
    blocks = [slice(k * runs, (k + 1) * runs) for k in range(passes)]
    medians = np.stack(
        [np.median(shares[:, b], axis=1) * np.median(run_totals[b]) for b in blocks], axis=1
    )
    return {n: [float(x) for x in medians[i]] for i, n in enumerate(names)}, unmatched


# ---- static estimate -------------------------------------------------------------------------

# Ops that only relabel memory (or make tiny shape tensors): free next to real work.
_FREE_OPS = {
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size", "Constant",
    "ConstantOfShape", "Dropout",
}
# Transcendental-heavy elementwise ops, counted as a few FLOPs per element.
_ELEMENTWISE_WEIGHT = {
    "Erf": 4, "Gelu": 8, "Tanh": 4, "Sigmoid": 4, "Exp": 4, "Log": 4, "Sqrt": 2, "Pow": 4,
    "Softplus": 4, "HardSigmoid": 2, "HardSwish": 3, "Mish": 8, "Elu": 4, "Selu": 4,
}
_REDUCE_OPS = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin", "GlobalAveragePool", "GlobalMaxPool",
}


def flops_costs(model: onnx.ModelProto, dim_sizes: dict[str, int] | None = None) -> dict[str, float]:
    """Per-sample FLOP estimate of every node, from shape-inferred shapes (never negative).

    A rough model on purpose: convolutions and matrix products are counted exactly
    (2 per multiply-add), everything else as a few FLOPs per element it touches, which is
    about right for the memory-bound ops that surround them.
    """
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = _shapes_per_sample(inferred, dim_sizes)
    costs = {}
    for node in inferred.graph.node:
        ins = [shapes.get(i) if i else None for i in node.input]
        outs = [shapes.get(o) if o else None for o in node.output]
        costs[node.name] = max(0.0, float(_node_flops(node, ins, outs)))
    return costs


def _shapes_per_sample(
    model: onnx.ModelProto, dim_sizes: dict[str, int] | None = None
) -> dict[str, tuple[int, ...]]:
    """Static shapes with the batch set to 1, a declared dynamic dim (``seq``) to its
    representative size in ``dim_sizes``, any other symbolic dim to 1."""
    sizes = dim_sizes or {}
    shapes: dict[str, tuple[int, ...]] = {}
    values = (*model.graph.input, *model.graph.value_info, *model.graph.output)
    for value in values:
        tensor = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor.HasField("shape"):
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, 1)
                for d in tensor.shape.dim
            )
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _node_flops(node: onnx.NodeProto, ins: list, outs: list) -> float:
    op = node.op_type
    out = outs[0] if outs else None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op in _FREE_OPS:
        return 0.0
    if op == "Conv" and len(ins) > 1 and ins[1] is not None:
        # weight (Cout, Cin/groups, k...): each output element needs Cin/groups * prod(k) MACs.
        macs_per_output = math.prod(ins[1][1:])
        bias = 1 if len(ins) > 2 and ins[2] is not None else 0
        return _numel(out) * (2 * macs_per_output + bias)
    if op == "ConvTranspose" and len(ins) > 1 and ins[1] is not None:
        # weight (Cin, Cout/groups, k...): each input element scatters into Cout/groups * prod(k).
        return 2.0 * _numel(ins[0]) * math.prod(ins[1][1:]) + _numel(out)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul") and ins and ins[0]:
        k = ins[0][-1]
        return 2.0 * _numel(out) * k
    if op == "Gemm" and ins and ins[0]:
        k = ins[0][0] if attrs.get("transA", 0) else ins[0][-1]
        bias = 1 if len(ins) > 2 and ins[2] is not None else 0
        return _numel(out) * (2.0 * k + bias)
    if op in ("MaxPool", "AveragePool", "LpPool"):
        return _numel(out) * math.prod(attrs.get("kernel_shape", [1]))
    if op in _REDUCE_OPS:
        return float(_numel(ins[0]) if ins else 0)
    if op in ("Softmax", "LogSoftmax"):
        return 5.0 * _numel(out)  # max, subtract, exp, sum, divide
    if op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization"):
        return 8.0 * _numel(out)  # mean, variance, normalise, scale and shift
    if op == "BatchNormalization":
        return 2.0 * _numel(out)
    return float(_ELEMENTWISE_WEIGHT.get(op, 1) * _numel(out))
