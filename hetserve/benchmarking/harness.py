"""The shared part of the serving benchmarks (benchmarks/serving_cpu.py, image_serving.py,
hf_serving.py, and the GPU rows of gpu_torchserve.py): the archives they compare and one server
row, measured the same way for every configuration.

A server row: a fresh TorchServe on 127.0.0.1 serving one archive; 16 closed-loop clients for
``jvm_warmup`` seconds first (a fresh JVM spends its first tens of seconds JIT-compiling:
measured, C2 alone took a quarter of a core), then an open-loop Poisson rate sweep in which each
rate starts from an idle server (``bench.point_runner``, 10 s request timeout), up to the highest
rate that meets the criteria (``knee.sweep_rates``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# the benchmarks size their rows by the topology's one count of usable cores
from handlers.hardware.topology import usable_cores as physical_cores
from hetserve.bench import point_runner
from hetserve.knee import Criteria, Sweep, sweep_rates
from hetserve.loadgen import Target, run_closed_loop
from hetserve.machine import machine_info
from hetserve.tsprocess import BASE_CONFIG, start_torchserve

# TorchServe settings every serving row shares unless it says otherwise.
SERVING: dict[str, Any] = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 10}
# hetserve's CPU rows ({cores}: see ``fill``): (b) whole model, one core group; (b') one group per
# core; (b'') one worker per core; (c) the two-stage pipeline over two core groups.
CPU_ROWS: dict[str, dict[str, Any]] = {
    "b_whole_one_group": {**SERVING, "hetserve": {"ratio": 1.0, "core_groups": "size:{cores}"}},
    "b2_whole_group_per_core": {**SERVING, "hetserve": {"ratio": 1.0, "core_groups": "size:1"}},
    "b3_whole_worker_per_core": {
        **SERVING, "minWorkers": "{cores}", "maxWorkers": "{cores}", "batchSize": 4,
        "hetserve": {"ratio": 1.0, "core_groups": "size:1"},
    },
    "c_pipeline_two_groups": {
        **SERVING,
        "hetserve": {"ratio": 0.5, "core_groups": "size:1", "cpu_head_groups": 1, "micro_batch": 2},
    },
}
JVM_WARMUP_CLIENTS = 16
REQUEST_TIMEOUT_S = 10.0


def fill(value: Any, cores: int) -> Any:
    """Substitute {cores} in a row's config (strings only), keeping numbers numbers."""
    if isinstance(value, dict):
        return {k: fill(v, cores) for k, v in value.items()}
    if isinstance(value, str) and "{cores}" in value:
        text = value.format(cores=cores)
        return int(text) if text.isdigit() else text
    return value


# ---- archives ---------------------------------------------------------------------------------


def packed_runtime_is_current(mar: Path) -> bool:
    """Whether ``mar`` carries this checkout's serving code (the ``handlers`` tree that
    ``copy_runtime`` packs). A cached archive from an older checkout would otherwise be served
    with its old handler, which may refuse today's shipped model-config keys."""
    import handlers

    src = Path(handlers.__file__).resolve().parent
    ours = {f"handlers/{p.relative_to(src).as_posix()}": p for p in src.rglob("*.py")
            if "__pycache__" not in p.parts}
    with zipfile.ZipFile(mar) as z:
        packed = {n for n in z.namelist() if n.startswith("handlers/") and n.endswith(".py")}
        return packed == set(ours) and all(z.read(n) == ours[n].read_bytes() for n in packed)


def hetserve_archive(store: Path, name: str, model: str, *options: str) -> Path:
    """``hetserve archive --model MODEL --model-name NAME OPTIONS`` into ``store``, once: a later
    run reuses the .mar while it carries this checkout's serving code and was built from the
    same model and options (recorded beside it)."""
    mar = store / f"{name}.mar"
    recipe = store / f"{name}.recipe.json"
    wanted = json.dumps({"model": model, "options": list(options)})
    if mar.exists() and not packed_runtime_is_current(mar):
        print(f"{mar} packs an older handlers/ than this checkout: rebuilding it", flush=True)
        mar.unlink()
    elif mar.exists() and (not recipe.exists() or recipe.read_text() != wanted):
        print(f"{mar} was built from another model or options: rebuilding it", flush=True)
        mar.unlink()
    if not mar.exists():
        subprocess.run(
            [sys.executable, "-m", "hetserve", "archive", "--model", model, "--model-name", name,
             "--export-path", str(store), "--quiet", *options],
            check=True,
        )
        recipe.write_text(wanted)
    return mar


def stock_archive(
    store: Path,
    name: str,
    handler: Path,
    *,
    serialized_file: Path | None = None,
    model_file: Path | None = None,
    extra_files: Sequence[Path] = (),
    config: Mapping[str, Any] | None = None,
) -> Path:
    """A stock TorchServe archive (torch-model-archiver's own packaging), once; ``config``
    becomes its model-config.yaml (TorchServe's defaults without one)."""
    import yaml
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    mar = store / f"{name}.mar"
    if mar.exists():
        return mar
    with tempfile.TemporaryDirectory() as tmp:
        config_file = None
        if config is not None:
            config_file = Path(tmp) / "model-config.yaml"
            config_file.write_text(yaml.safe_dump(dict(config)))
        generate_model_archive(ModelArchiverConfig(
            model_name=name, handler=str(handler), version="1.0",
            serialized_file=str(serialized_file) if serialized_file else None,
            model_file=str(model_file) if model_file else None,
            extra_files=",".join(map(str, extra_files)) or None,
            export_path=str(store), force=True,
            config_file=str(config_file) if config_file else None,
        ))
    return mar


def stock_eager_archive(
    store: Path, model: str, handler: Path, config: Mapping[str, Any] | None = None, tag: str = ""
) -> Path:
    """A zoo model as an eager model file (one class, seeded weights: no pickle) under the
    stock ``handler``."""
    name = f"stock_{model.replace('-', '_')}{tag}"
    if (store / f"{name}.mar").exists():
        return store / f"{name}.mar"
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "eager_model.py"
        model_file.write_text(
            "import torch\n\nfrom partitioner.zoo import build\n\n\n"
            "class EagerModel(torch.nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__()\n"
            f"        self.net = build({model!r}).module\n\n"
            "    def forward(self, x):\n"
            "        return self.net(x)\n"
        )
        return stock_archive(store, name, handler, model_file=model_file, config=config)


def whole_model_files(mar: Path, dest: Path) -> tuple[Path, list[Path]]:
    """The archive's whole-model .onnx extracted into ``dest`` (named by its manifest), and the
    external-data files it points at (ORT reads them next to the graph)."""
    from handlers.artifact.archive_safety import external_refs
    from handlers.artifact.contract import read_archive

    whole = read_archive(mar).manifest.whole_model
    with zipfile.ZipFile(mar) as archive:
        archive.extract(whole, dest)
        refs = external_refs(dest / whole)
        extra = sorted({dict(ref.entries)["location"] for ref in refs if ref.marked_external})
        for name in extra:
            archive.extract(name, dest)
    return dest / whole, [dest / name for name in extra]


# ---- the in-process ceiling ----------------------------------------------------------------------

# The in-process layouts the ceiling is the best of: one session whose intra-op threads span
# every physical core (ORT's defaults, unpinned: what a plain user runs); the same pinned the way
# hetserve's CPU executor pins a group of every core (its session options, spinning off); and
# data-parallel, one single-thread session per physical core, each driven from its own Python
# thread pinned to its core (ORT releases the GIL, so they run in parallel).
ONE_SESSION_ALL_CORES = "one_session_all_cores"
ONE_SESSION_ALL_CORES_PINNED = "one_session_all_cores_pinned"
SESSION_PER_CORE = "session_per_core"
CEILING_LAYOUTS = (ONE_SESSION_ALL_CORES, ONE_SESSION_ALL_CORES_PINNED, SESSION_PER_CORE)


def _example_batch(session: Any, batch: int) -> dict[str, Any]:
    import numpy as np

    spec = session.get_inputs()[0]
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]]
    return {spec.name: np.random.default_rng(0).standard_normal((batch, *dims), dtype=np.float32)}


def _timed_runs(session: Any, feeds: dict[str, Any], batch: int, deadline: float) -> tuple[int, float]:
    """Run until ``deadline`` (perf_counter): (samples done, when the last run ended)."""
    done = 0
    while time.perf_counter() < deadline:
        session.run(None, feeds)
        done += batch
    return done, time.perf_counter()


def one_session_samples_per_s(path: Path, threads: int, batch: int, seconds: float) -> float:
    """One ONNX Runtime session, ``threads`` intra-op threads (ORT's defaults otherwise), run
    back to back on one batch for ``seconds``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = _example_batch(session, batch)
    for _ in range(3):
        session.run(None, feeds)
    started = time.perf_counter()
    done, ended = _timed_runs(session, feeds, batch, started + seconds)
    return done / (ended - started)


def session_per_core_samples_per_s(path: Path, batch: int, seconds: float,
                                   cores: int | None = None) -> float:
    """One single-thread session per physical core (``cores`` of them, default every usable
    one), side by side: ``pinned_sessions_samples_per_s`` over one-core groups."""
    from handlers.hardware.topology import core_groups, probe

    return pinned_sessions_samples_per_s(path, batch, seconds, core_groups(probe(), "size:1")[:cores])


def one_pinned_session_samples_per_s(path: Path, batch: int, seconds: float,
                                     cores: int | None = None) -> float:
    """One session over the first ``cores`` physical cores (default every usable one), pinned
    as hetserve's CPU executor pins a group: ``pinned_sessions_samples_per_s`` over one group."""
    from handlers.hardware.topology import CoreGroup, probe

    return pinned_sessions_samples_per_s(path, batch, seconds, [CoreGroup.of(probe().cores[:cores])])


def pinned_sessions_samples_per_s(path: Path, batch: int, seconds: float, groups: Sequence[Any]) -> float:
    """One session per core group (``handlers.hardware.topology.CoreGroup``), each loaded and
    run in its own Python thread pinned as ``CpuExecutor`` pins (the thread on the group's first
    core, ORT's intra-op threads on the others, the executor's session options), all on one
    batch for the same ``seconds``: samples/s summed."""
    import onnxruntime as ort

    from handlers.executors.cpu import cpu_session_options

    window: list[float] = []
    # The barrier's action runs once, before any driver is released: one start for every clock.
    ready = threading.Barrier(len(groups), action=lambda: window.append(time.perf_counter()))
    counts: list[tuple[int, float]] = []
    failures: list[BaseException] = []

    def drive(group: Any) -> None:
        try:
            # Pin first, load second, as CpuExecutor does: the weights are touched from this core.
            os.sched_setaffinity(0, {group.cpus[0]})
            session = ort.InferenceSession(str(path), cpu_session_options(group, spinning=False),
                                           providers=["CPUExecutionProvider"])
            feeds = _example_batch(session, batch)
            for _ in range(3):
                session.run(None, feeds)
            ready.wait()  # every session loaded and warm: all start together
        except threading.BrokenBarrierError:
            return  # another driver failed; its error is the one reported
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failures.append(exc)
            ready.abort()
            return
        counts.append(_timed_runs(session, feeds, batch, window[0] + seconds))

    threads = [threading.Thread(target=drive, args=(g,), name=f"ceiling-{g.name}") for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return sum(n for n, _ in counts) / (max(end for _, end in counts) - window[0])


def in_process_ceiling(path: Path, batch: int, seconds: float, cores: int | None = None) -> dict[str, Any]:
    """The best in-process layout for ``path`` on ``cores`` physical cores (default: every
    usable one), batch ``batch``: each layout's samples/s, and the best one named.

    ``threads`` and ``samples_per_s`` keep the keys older reports had (total threads, the
    ceiling); ``layout`` names which layout set it."""
    usable = physical_cores()
    cores = min(cores or usable, usable)
    layouts = {
        ONE_SESSION_ALL_CORES: {"sessions": 1, "threads_per_session": cores, "pinned": False,
                                "samples_per_s": one_session_samples_per_s(path, cores, batch, seconds)},
        ONE_SESSION_ALL_CORES_PINNED: {
            "sessions": 1, "threads_per_session": cores, "pinned": True,
            "samples_per_s": one_pinned_session_samples_per_s(path, batch, seconds, cores)},
        SESSION_PER_CORE: {"sessions": cores, "threads_per_session": 1, "pinned": True,
                           "samples_per_s": session_per_core_samples_per_s(path, batch, seconds, cores)},
    }
    for row in layouts.values():
        row["samples_per_s"] = round(row["samples_per_s"], 2)
    best = max(layouts, key=lambda name: layouts[name]["samples_per_s"])
    return {"threads": cores, "batch": batch, "seconds": seconds,
            "samples_per_s": layouts[best]["samples_per_s"], "layout": best, "layouts": layouts}


# ---- one server row -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepSettings:
    """How each rate of a sweep is measured (seconds; rates in requests per second)."""

    duration: float = 10.0  # measured seconds per rate
    warmup: float = 3.0  # unmeasured seconds at the start of each rate
    jvm_warmup: float = 30.0  # seconds of closed-loop load on each fresh server first
    start_rate: float = 8.0
    factor: float = 1.3
    max_rate: float = 400.0
    refine: int = 3  # bisection steps after the sweep

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.warmup < 0 or self.jvm_warmup < 0:
            raise ValueError("duration must be > 0, warmup and jvm_warmup >= 0")
        if self.start_rate <= 0 or self.factor <= 1 or self.max_rate < self.start_rate:
            raise ValueError("need 0 < start_rate <= max_rate and factor > 1")
        if self.refine < 0:
            raise ValueError("refine must be >= 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SweepSettings:
        settings = cls(args.duration, args.warmup, args.jvm_warmup, args.start_rate, args.factor,
                       args.max_rate, args.refine)
        return settings.quick() if getattr(args, "quick", False) else settings

    def quick(self) -> SweepSettings:
        """A smoke run: short points, no refinement."""
        return SweepSettings(4.0, 1.0, 5.0, self.start_rate, 1.6, self.max_rate, 0)


def add_sweep_arguments(p: argparse.ArgumentParser, defaults: SweepSettings = SweepSettings(),
                        p99_ms: float = 500.0) -> None:
    p.add_argument("--p99-ms", type=float, default=p99_ms)
    p.add_argument("--duration", type=float, default=defaults.duration, help="measured seconds per rate")
    p.add_argument("--warmup", type=float, default=defaults.warmup,
                   help="unmeasured seconds at the start of each rate")
    p.add_argument("--jvm-warmup", type=float, default=defaults.jvm_warmup,
                   help="seconds of load on each fresh server first")
    p.add_argument("--start-rate", type=float, default=defaults.start_rate)
    p.add_argument("--factor", type=float, default=defaults.factor)
    p.add_argument("--max-rate", type=float, default=defaults.max_rate)
    p.add_argument("--refine", type=int, default=defaults.refine, help="bisection steps after the sweep")
    p.add_argument("--quick", action="store_true", help="short points, no refinement (smoke run)")


@dataclass(frozen=True)
class Load:
    """What every request of a row sends: bodies round-robin, the same headers each time."""

    bodies: Sequence[bytes]
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/octet-stream"

    @classmethod
    def tensor(cls, body: bytes, shape: Sequence[int]) -> Load:
        """One raw float32 tensor body of ``shape``."""
        return cls([body], {"X-Tensor-Shape": ",".join(map(str, shape))})


def sweep_server(
    store: Path,
    mar: str,
    workdir: Path,
    load: Load,
    settings: SweepSettings,
    criteria: Criteria,
    *,
    base_config: Path | None = None,
    overrides: dict[str, str] | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> Sweep:
    """One server row: start TorchServe with ``mar``, warm it, sweep the rate, stop it."""
    ts = start_torchserve(workdir, store, {"m": mar}, overrides=overrides,
                          base_config=base_config or BASE_CONFIG)
    try:
        headers = {"Authorization": f"Bearer {ts.keys['inference']}", **load.headers}
        target = Target.create(f"http://127.0.0.1:{ts.ports['inference']}/predictions/m",
                               load.bodies, headers, load.content_type)
        run_closed_loop(target, JVM_WARMUP_CLIENTS, settings.jvm_warmup, warmup=0.0)
        at = point_runner(target, duration=settings.duration, warmup=settings.warmup,
                          arrival="poisson", timeout=REQUEST_TIMEOUT_S, log=log)
        return sweep_rates(at, settings.start_rate, max_rate=settings.max_rate,
                           factor=settings.factor, stop_after_failures=2,
                           refine_steps=settings.refine, criteria=criteria)
    finally:
        ts.stop()


def report_header(criteria: Criteria) -> dict[str, Any]:
    """What every serving report starts with: how it was run, when, where, against what."""
    return {"command": shlex.join([sys.executable, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(),
            "criteria": asdict(criteria)}
