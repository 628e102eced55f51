"""Trials on a real TorchServe: the harness that serves each configuration (``LiveHarness``),
the whole ``hetserve tune`` command (``tune_archive``) and the side-by-side re-measurement
(``compare``)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from handlers.artifact.contract import read_archive
from handlers.artifact.manifest import Manifest
from handlers.hardware.topology import usable_cores
from hetserve.loadgen import LoadResult
from hetserve.properties import read_properties
from hetserve.tuner.report import report_markdown, study_report
from hetserve.tuner.settings import Settings, trial_settings, write_winner
from hetserve.tuner.space import find_libraries, search_space, shipped_defaults, with_defaults
from hetserve.tuner.study import (
    PointRunner,
    TrialFailed,
    TuneOptions,
    measure_max_rate,
    point_line,
    run_study,
    short_params,
)


def sample_shape(manifest: Manifest) -> tuple[int, ...]:
    spec = manifest.inputs[0]
    if spec.dtype != "float32" or any(d is None for d in spec.sample_shape):
        raise ValueError("the tuner sends float32 tensors of a fixed sample shape; this model's input is "
                         f"{spec.dtype} {list(spec.shape)}")
    return (1, *spec.sample_shape)


@dataclass(frozen=True)
class TrialRunner:
    """A prepared trial's load: `runner(rate)` one open-loop point (Poisson, from an idle server),
    `runner.closed(clients)` one closed loop; both with the harness's duration and warm-up."""

    open_at: PointRunner
    closed: Callable[[int], LoadResult]

    def __call__(self, rate: float) -> LoadResult:
        return self.open_at(rate)


class LiveHarness:
    """Serves trial configurations on one TorchServe, restarted only for server-level knobs.

    The server runs with the model API on (loopback, token auth, this harness only) so a trial
    that changes model-level knobs registers its variant on the warm JVM instead of paying a
    restart and another JIT warm-up.
    """

    def __init__(self, mar: Path, work: Path, *, duration: float = 4.0, warmup: float = 1.0,
                 jvm_warmup: float = 20.0, trial_warmup: float = 3.0, timeout: float = 10.0,
                 log: Callable[[str], None] = print, env: Mapping[str, str] | None = None) -> None:
        self.mar, self.work, self.log = mar, work, log
        self.duration, self.warmup, self.timeout = duration, warmup, timeout
        self.jvm_warmup, self.trial_warmup = jvm_warmup, trial_warmup
        # VIRTUAL_ENV: where the launcher looks for allocators; a private state dir keeps trial
        # histories out of the user's ~/.cache/hetserve
        self.env = {"VIRTUAL_ENV": os.environ.get("VIRTUAL_ENV") or sys.prefix,
                    "HETSERVE_STATE_DIR": str(work / "state"), **(env or {})}
        self.store = work / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.server = None
        self.server_key: str | None = None
        self.count = 0  # variants built
        self.starts = 0  # TorchServe starts
        self.shape = sample_shape(read_archive(mar).manifest)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server, self.server_key = None, None

    @contextlib.contextmanager
    def prepare(self, params: Mapping[str, Any]) -> Iterator[PointRunner]:
        from hetserve.bench import point_runner
        from hetserve.loadgen import run_closed_loop
        from partitioner.archive import with_config

        settings = trial_settings(params)
        self.count += 1
        variant = with_config(self.mar, self.store / f"trial{self.count}.mar", settings.model_overrides)
        self._serve(variant.name, settings, int(params["workers"]))
        target = self._target()
        if self.trial_warmup > 0:
            run_closed_loop(target, 4, self.trial_warmup, warmup=0.0, timeout=self.timeout)
        opened: list[PointRunner] = []

        def open_at(rate: float) -> LoadResult:
            if not opened:  # its idle-latency probes only when an open-loop point is wanted
                opened.append(point_runner(target, duration=self.duration, warmup=self.warmup, arrival="poisson",
                                           timeout=self.timeout, log=lambda _: None))
            return opened[0](rate)

        yield TrialRunner(open_at, lambda clients: run_closed_loop(target, clients, self.duration,
                                                                   warmup=self.warmup, timeout=self.timeout))

    def preloaded(self) -> list[str]:
        """Allocator/OpenMP libraries mapped into the model workers (proof the launcher applied them)."""
        names = set()
        for pid in self.server.worker_pids() if self.server else []:
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/maps").read_text()
                names |= {lib for lib in ("libjemalloc", "libtcmalloc", "libiomp5") if lib in text}
        return sorted(names)

    def _serve(self, mar_name: str, settings: Settings, workers: int) -> None:
        from hetserve.loadgen import run_closed_loop
        from hetserve.tsprocess import start_torchserve

        if self.server is not None and self.server_key == settings.server_key:
            self._register(mar_name, workers)
            return
        self.close()
        overrides = {**settings.properties, "enable_model_api": "true"}
        try:
            self.starts += 1  # a fresh folder per start: a stopped server leaves its pid file behind
            self.server = start_torchserve(self.work / f"ts{self.starts}", self.store, {"m": mar_name}, overrides=overrides,
                                           env=self.env, timeout=150)
        except (RuntimeError, TimeoutError) as exc:
            raise TrialFailed(f"TorchServe did not start: {exc}") from None
        self.server_key = settings.server_key
        self.log(f"  (restarted TorchServe: {settings.properties['cpu_launcher_args']}; "
                 f"workers preload {self.preloaded() or 'nothing'})")
        if self.jvm_warmup > 0:  # a fresh JVM JIT-compiles for its first tens of seconds
            run_closed_loop(self._target(), 8, self.jvm_warmup, warmup=0.0, timeout=self.timeout)

    def _target(self):
        from hetserve.bench import random_body
        from hetserve.loadgen import Target

        return Target.create(
            f"http://127.0.0.1:{self.server.ports['inference']}/predictions/m", random_body(self.shape),
            {"Authorization": f"Bearer {self.server.keys['inference']}", "X-Tensor-Shape": ",".join(map(str, self.shape))})

    def _register(self, mar_name: str, workers: int) -> None:
        ts = self.server
        gone = ts.request("DELETE", "/models/m", api="management", timeout=120)
        if gone.status not in (200, 404):
            raise TrialFailed(f"could not unregister the previous trial: {gone.status} {gone.body[:300]!r}")
        resp = ts.request("POST", f"/models?url={mar_name}&model_name=m&initial_workers={workers}&synchronous=true",
                          api="management", timeout=150)
        if resp.status != 200:
            raise TrialFailed(f"registering {mar_name} failed: {resp.status} {resp.body[:500]!r}")


def tune_archive(mar: Path, out: Path, options: TuneOptions, work: Path, harness_options: Mapping[str, Any],
                 fixed: Mapping[str, Any] | None = None, base_properties: Path | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """The whole command: space from this machine, study on live servers, winner and report."""
    from hetserve.machine import machine_info, run_record
    from hetserve.tsprocess import BASE_CONFIG

    base_properties = base_properties or BASE_CONFIG
    archive = read_archive(mar)
    libraries = find_libraries({**os.environ, "VIRTUAL_ENV": os.environ.get("VIRTUAL_ENV") or sys.prefix})
    for note in libraries.notes:
        log(f"note: {note}")
    defaults = shipped_defaults(archive.model_config, archive.manifest.default_ratio, read_properties(base_properties))
    ratios = [p.ratio for p in archive.manifest.partitions]
    space = with_defaults(search_space(usable_cores(), ratios, libraries), defaults)
    for knob, value in (fixed or {}).items():
        if knob not in space:
            raise ValueError(f"--fix {knob}: unknown knob; knobs: {', '.join(space)}")
        space[knob] = (value,)
        defaults = {**defaults, knob: value}
    harness = LiveHarness(mar, work, log=log, **harness_options)
    try:
        study = run_study(space, harness.prepare, options, defaults=defaults, log=log,
                          timeout_ms=harness.timeout * 1000)
    finally:
        harness.close()
    report = {**run_record(), "machine": machine_info(), "archive": mar.name,
              **study_report(study, options, space, libraries)}
    out.mkdir(parents=True, exist_ok=True)
    if report["best"]:
        write_winner(out, archive.model_config, report["best"]["params"], base_properties)
    (out / "tune_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "tune_report.md").write_text(report_markdown(report))
    return report


def compare(mar: Path, report_path: Path, out: Path, work: Path, options: TuneOptions,
            harness_options: Mapping[str, Any], log: Callable[[str], None] = print) -> dict:
    """Re-measure the shipped default and the tuned winner side by side, each on a fresh server
    (same warm-up), with a full sweep: the figure to quote for the tuner's gain."""
    from hetserve.knee import plot_curves
    from hetserve.machine import machine_info, run_record

    report = json.loads(report_path.read_text())
    if not report.get("best") or not report.get("default"):
        raise ValueError(f"{report_path} has no best and default trial to compare")
    rows, curves = {}, {}
    for label in ("default", "best"):
        params = report[label]["params"]
        log(f"== {label}: {short_params(params)}")
        harness = LiveHarness(mar, work / label, log=log, **harness_options)
        try:
            with harness.prepare(params) as at:
                value, points, _ = measure_max_rate(at, options, None, on_point=lambda r: log(f"    {point_line(r)}"))
        finally:
            harness.close()
        rows[label] = {"params": params, "max_rate": value, "points": [json.loads(p.to_json()) for p in points]}
        curves[label] = points
    gain = rows["best"]["max_rate"] / rows["default"]["max_rate"] if rows["default"]["max_rate"] else math.inf
    result = {**run_record(), "machine": machine_info(), "criteria": asdict(options.criteria),
              "rows": rows, "gain": gain, "goal": 1.3, "goal_met": gain >= 1.3}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_curves(curves, out / "compare.png", log_y=True, criteria=options.criteria,
                title=f"{mar.stem}: shipped default vs tuned")
    log(f"default {rows['default']['max_rate']:.1f} req/s, tuned {rows['best']['max_rate']:.1f} req/s: {gain:.2f}x")
    return result
