"""Decide what runs where: stages from the manifest, executors from the hardware, then calibrate.

* Partitioned, with a GPU: the head runs on CUDA streams; the tail may run on the streams or
  on any CPU core group, chosen per micro-batch.
* Partitioned, CPU only: head and tail on CPU core groups. ``cpu_head_groups = k`` reserves the
  first k groups for the head and the others for the tail (the paper's pipelined core
  clusters); 0 lets the scheduler place both stages on any group.
* Whole model (ratio >= 1 or no partitions in the archive): one stage on every executor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from handlers.executors import CpuExecutor, Executor
from handlers.manifest import Manifest, TensorSpec, random_batch
from handlers.perf_model import PerfHistory
from handlers.pipeline import Runtime, StagePlan
from handlers.runtime_config import RuntimeConfig
from handlers.topology import CoreGroup, plan_groups, probe

log = logging.getLogger(__name__)


def stage_plans(
    manifest: Manifest,
    config: RuntimeConfig,
    head_executors: Sequence[str],
    tail_executors: Sequence[str],
) -> tuple[list[StagePlan], dict[str, str]]:
    """The stages to run and, per stage, the archive file it loads."""
    partition = manifest.partition_for(config.ratio)
    inputs = tuple(s.name for s in manifest.inputs)
    outputs = tuple(s.name for s in manifest.outputs)
    if partition is None:
        every = tuple(dict.fromkeys([*head_executors, *tail_executors]))
        return [StagePlan("whole", inputs, outputs, every)], {"whole": manifest.whole_model}
    cut = tuple(t.name for t in partition.cut_tensors)
    head_out = tuple(dict.fromkeys([*(n for n in cut if n not in inputs), *partition.head_outputs]))
    tail_out = tuple(o for o in outputs if o not in partition.head_outputs)
    plans = [
        StagePlan("head", inputs, head_out, tuple(head_executors)),
        StagePlan("tail", cut, tail_out, tuple(tail_executors)),
    ]
    return plans, {"head": partition.head, "tail": partition.tail}


def split_cpu_groups(
    groups: Sequence[CoreGroup], head_groups: int
) -> tuple[list[CoreGroup], list[CoreGroup]]:
    if head_groups <= 0 or len(groups) < 2:
        return list(groups), list(groups)
    k = min(head_groups, len(groups) - 1)
    return list(groups[:k]), list(groups[k:])


def build_runtime(
    manifest: Manifest, model_dir: Path, config: RuntimeConfig, history: PerfHistory
) -> Runtime:
    partitioned = manifest.partition_for(config.ratio) is not None
    topology = probe()
    groups = plan_groups(topology, config.core_groups, min_groups=2 if partitioned else 1)
    head_groups, tail_groups = split_cpu_groups(
        groups, config.cpu_head_groups if partitioned else 0
    )
    log.info("hetserve: %s; groups %s", topology.describe(), [g.name for g in groups])

    head_names = [g.name for g in head_groups]
    tail_names = [g.name for g in tail_groups]
    plans, files = stage_plans(manifest, config, head_names, tail_names)

    executors: list[Executor] = []
    runtime_ref: list[Runtime] = []

    def observe(stage: str, executor: str, batch: int, seconds: float) -> None:
        if runtime_ref:
            runtime_ref[0].observe_run(stage, executor, batch, seconds)

    for group in groups:
        name = group.name
        stages = {p.name: model_dir / files[p.name] for p in plans if name in p.candidates}
        executors.append(CpuExecutor(group, stages, spinning=config.spinning, observer=observe))
    try:
        for executor in executors:
            executor.start()
    except Exception:
        for executor in executors:
            executor.close()
        raise
    runtime = Runtime(
        plans,
        executors,
        history,
        [s.name for s in manifest.outputs],
        micro_batch=config.micro_batch,
        stage_timeout_s=config.stage_timeout_s,
    )
    runtime_ref.append(runtime)
    calibrate(runtime, manifest, config)
    return runtime


def calibrate(
    runtime: Runtime, manifest: Manifest, config: RuntimeConfig, batches: Sequence[int] = (1, 4)
) -> None:
    """Warm every (stage, executor) pair and seed the history where it has nothing yet."""
    specs = _stage_input_specs(manifest, config)
    rng = np.random.default_rng(0)
    for plan in runtime.stages:
        for name in plan.candidates:
            executor = runtime.executors[name]
            known = runtime.history.is_calibrated(plan.name, name)
            runs = 1 if known else max(config.calibration_runs, 1)
            for batch in batches if not known else batches[:1]:
                feeds = {n: random_batch(specs[n], batch, rng) for n in plan.inputs}
                executor.submit(plan.name, feeds, batch, observe=False).result(
                    timeout=config.stage_timeout_s * 4
                )
                for _ in range(runs):
                    executor.submit(plan.name, feeds, batch).result(
                        timeout=config.stage_timeout_s * 4
                    )


def _stage_input_specs(manifest: Manifest, config: RuntimeConfig) -> dict[str, TensorSpec]:
    specs = {s.name: s for s in manifest.inputs}
    partition = manifest.partition_for(config.ratio)
    if partition is not None:
        specs.update({s.name: s for s in partition.cut_tensors})
    return specs
