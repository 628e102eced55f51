"""How much can sending tails to the CPU raise the rate a GPU holds? An upper bound.

StarONNX's gain comes from taking the tail's share of GPU time off a saturated GPU. With a
fraction ``f`` of the tails on the CPU, each batch costs the GPU ``head + (1 - f) * tail`` and
the CPU side ``f * max(cpu_tail / groups, transfer)`` (the core groups run tails in parallel; the
cut tensor's copies share one copy engine). The rate is the smaller of the two limits; the GPU
limit rises with ``f`` and the CPU limit falls, so the best ``f`` is where they meet:

    f* = gpu_batch / (cpu_per_batch + tail),   clipped to [0, 1]
    gain = gpu_batch / (gpu_batch - f* * tail)  <=  1 / head_share

The bound assumes batches are in flight together (several TorchServe workers, or a pipeline):
with one synchronous worker a CPU tail only adds to its batch's time and nothing is gained
unless the CPU runs the tail faster than the GPU. Pure arithmetic on plain numbers; feed it
measured times (``benchmarks/timeline.py`` gives them per stage and device).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class OffloadInputs:
    gpu_head_ms: float  # one batch's head on the GPU
    gpu_tail_ms: float  # the same batch's tail on the GPU
    cpu_tail_ms: float  # the same batch's tail on one CPU core group
    cpu_groups: int = 1  # core groups that run tails at the same time
    transfer_ms: float = 0.0  # the cut tensor's copy to the host, per batch

    def __post_init__(self) -> None:
        for name in ("gpu_head_ms", "gpu_tail_ms", "cpu_tail_ms", "transfer_ms"):
            value = getattr(self, name)
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.gpu_head_ms + self.gpu_tail_ms <= 0:
            raise ValueError("the GPU times must not both be 0")
        if self.cpu_groups < 1:
            raise ValueError(f"cpu_groups must be >= 1, got {self.cpu_groups}")


@dataclass(frozen=True)
class OffloadBound:
    cpu_share: float  # f*: the share of tails to send to the CPU
    batches_per_s: float  # the rate at f*
    gpu_only_batches_per_s: float  # every tail on the GPU
    gain: float  # batches_per_s / gpu_only_batches_per_s, >= 1
    limit: str  # what stops a higher rate at f*: "gpu", "cpu" or "both"
    ceiling: float  # 1 / head share of GPU time: the gain with a CPU of unbounded speed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def offload_bound(x: OffloadInputs) -> OffloadBound:
    whole = x.gpu_head_ms + x.gpu_tail_ms
    cpu_per_batch = max(x.cpu_tail_ms / x.cpu_groups, x.transfer_ms)
    if cpu_per_batch + x.gpu_tail_ms > 0:
        share = min(1.0, whole / (cpu_per_batch + x.gpu_tail_ms))
    else:
        share = 1.0
    gpu_ms = whole - share * x.gpu_tail_ms
    cpu_ms = share * cpu_per_batch
    busiest = max(gpu_ms, cpu_ms)
    limit = "gpu" if gpu_ms > cpu_ms else "cpu"
    if abs(gpu_ms - cpu_ms) <= 1e-9 * whole:
        limit = "both"
    ceiling = whole / x.gpu_head_ms if x.gpu_head_ms > 0 else float("inf")
    return OffloadBound(
        cpu_share=share,
        batches_per_s=1e3 / busiest,
        gpu_only_batches_per_s=1e3 / whole,
        gain=whole / busiest,
        limit=limit,
        ceiling=ceiling,
    )


def head_share_for_gain(gain: float) -> float:
    """The largest head share of GPU time that can still reach ``gain`` (with a CPU fast
    enough): the cut must leave at least ``1 - 1/gain`` of the GPU time in the tail."""
    if gain < 1:
        raise ValueError(f"gain must be >= 1, got {gain}")
    return 1.0 / gain


def inputs_from_runs(
    gpu_runs: Mapping[str, Mapping[str, float]],
    cpu_runs: Mapping[str, Mapping[str, float]],
    batch: int,
    cpu_groups: int,
) -> OffloadInputs:
    """Inputs from two timeline reports' ``runs`` (``handlers.observability.tracing.overlap_report``): one run
    with the tails on the GPU, one with them on the CPU. GPU runs are padded to the batch, so
    their mean run is a batch; CPU runs see the real rows, so they are scaled to ``batch``."""

    def stats(runs: Mapping[str, Mapping[str, float]], key: str, which: str) -> Mapping[str, float]:
        run = runs.get(key)
        if not run or not run.get("count"):
            raise ValueError(f"the {which} timeline has no {key!r} runs")
        return run

    def mean_ms(runs, key, which) -> float:
        run = stats(runs, key, which)
        return 1e3 * run["seconds"] / run["count"]

    def batch_ms(runs, key, which) -> float:
        run = stats(runs, key, which)
        if not run.get("rows"):
            raise ValueError(f"the {which} timeline's {key!r} runs carry no row counts")
        return 1e3 * run["seconds"] / run["rows"] * batch

    links = [key for key in cpu_runs if "->cpu" in key]
    return OffloadInputs(
        gpu_head_ms=mean_ms(gpu_runs, "head@cuda", "GPU-tail"),
        gpu_tail_ms=mean_ms(gpu_runs, "tail@cuda", "GPU-tail"),
        cpu_tail_ms=batch_ms(cpu_runs, "tail@cpu", "CPU-tail"),
        cpu_groups=cpu_groups,
        transfer_ms=batch_ms(cpu_runs, links[0], "CPU-tail") if links else 0.0,
    )
