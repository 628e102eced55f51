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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from handlers.artifact.example_inputs import example_feeds
from handlers.artifact.manifest import Manifest, Partition, TensorSpec, serves_split
from handlers.errors import ExecutorLoadError
from handlers.executors.base import Executor, StageOutputs
from handlers.executors.cpu import CpuExecutor
from handlers.executors.cuda import cuda_unavailable_reason
from handlers.hardware.topology import Topology, plan_groups, probe, split_cpu_groups
from handlers.runtime.config import ConfigError, RuntimeConfig
from handlers.runtime.flow import Runtime, StagePlan
from handlers.runtime.layout_choice import WHOLE, choose, time_alternating
from handlers.runtime.perf_model import PerfHistory
from handlers.runtime.quarantine import Quarantine

if TYPE_CHECKING:
    from handlers.testing.faults import FaultInjector

log = logging.getLogger(__name__)


def stage_plans(
    manifest: Manifest,
    partition: Partition | None,
    head_executors: Sequence[str],
    tail_executors: Sequence[str],
) -> tuple[list[StagePlan], dict[str, str]]:
    """The stages to run and, per stage, the float32 archive file it loads (``partition``: the
    served cut, None for the whole model; CPU executors load ``cpu_stage_files`` instead)."""
    inputs = tuple(s.name for s in manifest.inputs)
    outputs = tuple(s.name for s in manifest.outputs)
    if partition is None:
        every = tuple(dict.fromkeys([*head_executors, *tail_executors]))
        return [StagePlan("whole", inputs, outputs, every)], manifest.stage_files(None)
    cut = tuple(t.name for t in partition.cut_tensors)
    head_out = tuple(dict.fromkeys([*(n for n in cut if n not in inputs), *partition.head_outputs]))
    tail_out = tuple(o for o in outputs if o not in partition.head_outputs)
    plans = [
        StagePlan("head", inputs, head_out, tuple(head_executors)),
        StagePlan("tail", cut, tail_out, tuple(tail_executors)),
    ]
    return plans, manifest.stage_files(partition)


def cpu_stage_files(
    manifest: Manifest, partition: Partition | None, precision: str
) -> dict[str, str]:
    """The files CPU executors load: the ``hetserve.precision`` variant of the served stages
    (int8 runs on CPU cores only; a GPU keeps the float graph). Same stage names, same
    float32 inputs and outputs, so the flow and the scheduler see stages, not precisions."""
    return manifest.stage_files(partition, precision)


@dataclass(frozen=True)
class Layout:
    """Which executors may run the head and the tail (or the whole model)."""

    head: tuple[str, ...]
    tail: tuple[str, ...]


def choose_layout(
    partitioned: bool,
    cuda: Sequence[str],
    head_cpu: Sequence[str],
    tail_cpu: Sequence[str],
    config: RuntimeConfig,
) -> Layout:
    """Pure: the device classes per stage from what exists and what the config allows."""
    if config.tail_devices == "cuda" and not cuda:
        raise ConfigError("hetserve.tail_devices is 'cuda' but no CUDA executor could start")
    if config.head_devices == "cuda" and not cuda:
        raise ConfigError("hetserve.head_devices is 'cuda' but no CUDA executor could start")
    head = tuple(cuda) if cuda and config.head_devices != "cpu" else tuple(head_cpu)
    if not partitioned:
        return Layout(head, head)
    if head == tuple(cuda):
        # With the head on the GPU every core group is free for tails.
        tail_cpu = tuple(dict.fromkeys([*head_cpu, *tail_cpu]))
    tail = {
        "cpu": tuple(tail_cpu),
        "cuda": tuple(cuda),
        "auto": (*cuda, *tail_cpu),
    }[config.tail_devices]
    return Layout(head, tail)


def build_runtime(
    manifest: Manifest, model_dir: Path, config: RuntimeConfig, history: PerfHistory,
    topology: Topology | None = None,
) -> Runtime:
    # Worked out once per load: the partition (partition_for may log a "nearest partition" line)
    # and the cores (read from /sys; the caller's probe when it has one).
    partition = manifest.partition_for(config.ratio)
    topology = topology or probe()
    wants_cuda = not (config.head_devices == "cpu" and config.tail_devices == "cpu")
    if wants_cuda and (reason := cuda_unavailable_reason()) is None:
        try:
            return _build(manifest, model_dir, config, history, partition, topology, use_cuda=True)
        except ExecutorLoadError as exc:
            if "cuda" in (config.head_devices, config.tail_devices):
                raise
            log.warning("hetserve: GPU not usable (%s); serving on CPU core groups only", exc)
    elif wants_cuda and "cuda" in (config.head_devices, config.tail_devices):
        raise ConfigError(f"hetserve asks for CUDA but it is unavailable: {reason}")
    if partition is not None and not serves_split(config.ratio, manifest.default_ratio,
                                                   len(topology.cores)):
        # One core (a worker's share when TorchServe runs one worker per core) is one group:
        # head and tail would take turns on it, the whole model's work plus a hand-over.
        log.info("hetserve: one core in this worker's share: serving the whole model (the "
                 "archive's head/tail split needs two core groups on CPU)")
        config = replace(config, ratio=1.0)
        partition = None
    runtime = _build(manifest, model_dir, config, history, partition, topology, use_cuda=False)
    if config.compare_whole and partition is not None and config.ratio is None and not config.faults:
        runtime = _keep_faster_layout(runtime, manifest, model_dir, config, history, topology)
    return runtime


# Batches timed through each layout at load (alternating, after both are calibrated and warm).
LAYOUT_CHECK_ROUNDS = 5


def _keep_faster_layout(
    runtime: Runtime,
    manifest: Manifest,
    model_dir: Path,
    config: RuntimeConfig,
    history: PerfHistory,
    topology: Topology,
) -> Runtime:
    """The split layout or the whole model on one group of every core, whichever ran a
    batchSize batch faster (handlers.runtime.layout_choice); the other is closed."""
    cores = len(topology.cores)
    whole_config = replace(config, ratio=1.0, core_groups=f"size:{cores}", cpu_head_groups=0, micro_batch=0)
    try:
        whole = _build(manifest, model_dir, whole_config, history, None, topology, use_cuda=False)
    except Exception:
        runtime.close()
        raise
    rng = np.random.default_rng(2)
    feeds = example_feeds(manifest.inputs, config.batch_size, rng)
    try:
        times = time_alternating(lambda: runtime.infer(feeds), lambda: whole.infer(feeds), LAYOUT_CHECK_ROUNDS)
    except Exception:
        whole.close()
        runtime.close()
        raise
    decision = choose(*times, batch=config.batch_size)
    log.info("hetserve: %s", decision.describe())
    kept, dropped = (whole, runtime) if decision.keep == WHOLE else (runtime, whole)
    dropped.close()
    return kept


def _build(
    manifest: Manifest,
    model_dir: Path,
    config: RuntimeConfig,
    history: PerfHistory,
    partition: Partition | None,
    topology: Topology,
    use_cuda: bool,
) -> Runtime:
    partitioned = partition is not None
    if use_cuda and len(topology.cores) >= 4:
        # One core stays with the threads that drive the GPU and talk to TorchServe.
        topology = replace(topology, cores=topology.cores[1:])
    min_groups = 2 if partitioned and not use_cuda else 1
    groups = plan_groups(topology, config.core_groups, min_groups=min_groups)
    head_groups, tail_groups = split_cpu_groups(
        groups, config.cpu_head_groups if partitioned and not use_cuda else 0
    )
    cuda_names = [f"cuda{config.cuda_device}s{i}" for i in range(config.cuda_streams)] if use_cuda else []
    layout = choose_layout(
        partitioned, cuda_names, [g.name for g in head_groups], [g.name for g in tail_groups], config
    )
    plans, files = stage_plans(manifest, partition, layout.head, layout.tail)
    cpu_files = cpu_stage_files(manifest, partition, config.precision)
    log.info(
        "hetserve: %s; head on %s, tail on %s; %s stages on CPU",
        topology.describe(), list(layout.head), list(layout.tail) if partitioned else "-",
        config.precision,
    )

    def stages_for(name: str, files: Mapping[str, str] = files) -> dict[str, Path]:
        return {p.name: model_dir / files[p.name] for p in plans if name in p.candidates}

    executors: list[Executor] = []
    if cuda_names:
        from handlers.executors.cuda import CudaExecutor

        # Cut tensors stay on the GPU when a GPU tail may consume them without a copy.
        keep = _device_outputs(manifest, partition) if set(cuda_names) & set(layout.tail) else ()
        for i, name in enumerate(cuda_names):
            executors.append(CudaExecutor(
                stages_for(name), config.cuda_device, i, device_outputs=keep,
                pad_batch=gpu_pad_batch(config, len(cuda_names)), cuda_graph=config.cuda_graph,
            ))
    for group in groups:
        if stages := stages_for(group.name, cpu_files):
            executors.append(CpuExecutor(group, stages, spinning=config.spinning))
    _start_all(executors)
    injector = _fault_injector(config)
    for executor in executors:
        executor.faults = injector
    runtime = Runtime(
        plans,
        executors,
        history,
        [s.name for s in manifest.outputs],
        micro_batch=config.micro_batch,
        stage_timeout_s=config.stage_timeout_s,
        request_timeout_s=config.request_timeout_s,
        clock=time.perf_counter,  # the one clock: placement, deadlines, quarantine back-off
        quarantine=Quarantine(
            [e.name for e in executors],
            after_failures=config.quarantine_after,
            backoff_s=config.probe_backoff_s,
            max_backoff_s=config.probe_backoff_max_s,
            clock=time.perf_counter,
        ),
        probe_feeds=probe_feeds(plans, manifest, partition),
    )
    # The executors report into the runtime's history from here on; nothing has run on them yet.
    for executor in executors:
        executor.run_observer = runtime.observe_run
        executor.transfer_observer = runtime.observe_transfer
    runtime.start()
    try:
        calibrate(StageRunner.of(runtime, config), runtime.history, manifest, config, partition)
    except Exception:
        runtime.close()
        raise
    if injector is not None:
        # Armed after calibration: a faulty test config must still load.
        log.warning("hetserve: fault injection armed (tests only): %s", config.faults)
        injector.arm()
    return runtime


def _fault_injector(config: RuntimeConfig) -> FaultInjector | None:
    """Tests only: the test-support module is imported only when a config asks for faults."""
    if not config.faults:
        return None
    from handlers.testing.faults import FaultInjector

    return FaultInjector(config.faults)


def gpu_pad_batch(config: RuntimeConfig, head_lanes: int) -> int:
    """The fixed row count of every GPU run: the largest micro-batch a TorchServe batch makes."""
    if not config.cuda_fixed_batch:
        return 0
    if config.micro_batch > 0:
        return config.micro_batch
    return -(-config.batch_size // max(head_lanes, 1))


def _start_all(executors: Sequence[Executor]) -> None:
    try:
        for executor in executors:
            executor.start()
    except Exception:
        for executor in executors:
            executor.close()
        raise


def _device_outputs(manifest: Manifest, partition: Partition | None) -> tuple[str, ...]:
    outputs = {s.name for s in manifest.outputs}
    return tuple(t.name for t in partition.cut_tensors if t.name not in outputs) if partition else ()


@dataclass(frozen=True)
class StageRunner:
    """What calibration runs on: the stages, their executors, and how long one run may take."""

    stages: tuple[StagePlan, ...]
    executors: Mapping[str, Executor]
    timeout_s: float

    @classmethod
    def of(cls, runtime: Runtime, config: RuntimeConfig) -> StageRunner:
        # Calibration runs may be slower than served ones (first runs, cold caches).
        return cls(runtime.stages, runtime.executors, config.stage_timeout_s * 4)

    def run(
        self,
        stage: str,
        executor: str,
        feeds: Mapping[str, np.ndarray],
        batch: int,
        observe: bool = False,
    ) -> StageOutputs:
        """One run, waited for; only an observed run enters the performance history."""
        job = self.executors[executor].submit(stage, feeds, batch, observe=observe)
        return job.result(timeout=self.timeout_s)


def calibrate(
    runner: StageRunner,
    history: PerfHistory,
    manifest: Manifest,
    config: RuntimeConfig,
    partition: Partition | None,
    batches: Sequence[int] = (1, 4),
) -> None:
    """Warm every (stage, executor) pair and seed the history where it has nothing yet.

    Pairs the persisted history already knows (a restarted worker) get one short run.
    """
    specs = _stage_input_specs(manifest, partition)
    rng = np.random.default_rng(0)
    pairs = [(plan.name, name) for plan in runner.stages for name in plan.candidates]
    known = [pair for pair in pairs if history.is_calibrated(*pair)]
    log.info(
        "hetserve: performance history has %d of %d (stage, executor) pairs calibrated%s",
        len(known), len(pairs), "; calibration shortened for them" if known else "",
    )
    # Later stages get the earlier stages' real outputs: a random cut tensor (an index, a mask)
    # can be a value the tail never sees and fail where real traffic would not.
    real = {batch: pipeline_feeds(runner, specs, batch, rng) for batch in batches}
    for plan in runner.stages:
        for name in plan.candidates:
            calibrated = history.is_calibrated(plan.name, name)
            runs = 1 if calibrated else max(config.calibration_runs, 1)
            for batch in batches if not calibrated else batches[:1]:
                feeds = real[batch][plan.name]
                runner.run(plan.name, name, feeds, batch)  # warm-up, not observed
                for _ in range(runs):
                    runner.run(plan.name, name, feeds, batch, observe=True)
    warm_every_size(runner, config, specs, rng, skip=batches)


def pipeline_feeds(
    runner: StageRunner, specs: dict[str, TensorSpec], batch: int, rng: np.random.Generator
) -> dict[str, dict[str, np.ndarray]]:
    """Feeds for every stage at ``batch``: random model inputs, then each stage's real outputs
    (run once, unobserved, on its first candidate) for the stages after it."""
    available = example_feeds(list(specs.values()), batch, rng)
    feeds: dict[str, dict[str, np.ndarray]] = {}
    for plan in runner.stages:
        feeds[plan.name] = {n: available[n] for n in plan.inputs}
        outputs = runner.run(plan.name, plan.candidates[0], feeds[plan.name], batch)
        available.update({k: _on_host(v) for k, v in outputs.items()})
    return feeds


def _on_host(value: Any) -> np.ndarray:
    """A stage output as a host array (a CUDA executor may leave one on its GPU)."""
    return value if isinstance(value, np.ndarray) else value.to_host()


def warmup_sizes(largest: int, pad_batch: int, done: Sequence[int]) -> list[int]:
    """Batch sizes 1..largest whose run shape the calibration runs (``done``) did not warm.

    A padded executor runs every size below ``pad_batch`` at that one shape: warming it once
    is enough.
    """
    warmed = {max(b, pad_batch) for b in done}
    sizes: dict[int, int] = {}
    for batch in range(1, largest + 1):
        sizes.setdefault(max(batch, pad_batch), batch)
    return [batch for shape, batch in sizes.items() if shape not in warmed]


# Warming costs one run per size; past this, an unusual size pays its first run when it comes.
WARMUP_MAX_BATCH = 64


def warm_every_size(
    runner: StageRunner,
    config: RuntimeConfig,
    specs: dict[str, TensorSpec],
    rng: np.random.Generator,
    skip: Sequence[int],
) -> None:
    """Run each GPU stage once at every batch size a TorchServe batch can be cut into.

    ORT's CUDA provider plans memory for each new input shape and, with cuDNN, picks conv
    algorithms for it: on an H100 the first GoogLeNet batch of each new size stalled the worker
    for hundreds of milliseconds, so unwarmed sizes showed up as seconds of tail latency.
    """
    largest = min(config.batch_size, WARMUP_MAX_BATCH)
    for plan in runner.stages:
        for name in plan.candidates:
            executor = runner.executors[name]
            if executor.device == "cpu":
                continue
            for batch in warmup_sizes(largest, executor.pad_batch, skip):
                feeds = pipeline_feeds(runner, specs, batch, rng)[plan.name]
                runner.run(plan.name, name, feeds, batch)


def probe_feeds(
    plans: Sequence[StagePlan], manifest: Manifest, partition: Partition | None
) -> Callable[[str], dict[str, np.ndarray]]:
    """Batch-1 random feeds per stage, made once: what re-probes a quarantined executor."""
    specs = _stage_input_specs(manifest, partition)
    rng = np.random.default_rng(1)
    feeds = {p.name: example_feeds([specs[n] for n in p.inputs], 1, rng) for p in plans}
    return feeds.__getitem__


def _stage_input_specs(manifest: Manifest, partition: Partition | None) -> dict[str, TensorSpec]:
    specs = {s.name: s for s in manifest.inputs}
    if partition is not None:
        specs.update({s.name: s for s in partition.cut_tensors})
    return specs
