"""``hetserve tune``: Bayesian search (optuna TPE) over serving knobs, measured on a real TorchServe.

Seed 004 tunes cores, allocator and OpenMP with SigOpt; this tunes what decides a hetserve
deployment's throughput: TorchServe workers, core-group policy and size (which is also the ORT
intra-op thread count: one pinned thread per core of a group), head groups, spinning,
micro-batch, batchSize, maxBatchDelay, partition ratio, the launcher's memory allocator and its
OpenMP runtime. Objective: the highest offered rate (Poisson arrivals) whose p99 stays under the
target, or the lowest p99 at a given rate.

A trial is an archive variant (`partitioner.archive.with_config`, no re-cut) served by one
TorchServe: registered on the running server over the management API when only model-level knobs
change, a restart when a server-level knob (launcher allocator/OpenMP) changes. Pruning: a
trial's sweep starts at `prune_fraction` x the best rate so far; a trial that cannot sustain even
that is stopped after that one point. The shipped default is trial 0, so the report's gain is
measured against it in the same session.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from handlers.artifact.contract import read_archive
from handlers.artifact.manifest import Manifest
from hetserve.knee import Criteria, offered_rate, sustains, sweep_rates
from hetserve.loadgen import LoadResult

# model-config.yaml keys (top level or hetserve.*) and the launcher's, per knob
MODEL_KNOBS = ("workers", "batchSize", "maxBatchDelay", "ratio", "core_groups", "cpu_head_groups",
               "micro_batch", "spinning")
SERVER_KNOBS = ("allocator", "openmp")
ALLOCATOR_FLAGS = {"default": "--use-default-allocator", "jemalloc": "--enable-jemalloc",
                   "tcmalloc": "--enable-tcmalloc"}
WHOLE_MODEL = 1.0

PointRunner = Callable[[float], LoadResult]
# params -> context manager yielding a rate -> LoadResult function for a server set up for them
Prepare = Callable[[dict[str, Any]], contextlib.AbstractContextManager[PointRunner]]


class TrialFailed(RuntimeError):
    """The configuration could not be served (load error, worker crash): scored 0, not retried."""


# ---------------------------------------------------------------------------- what to search


@dataclass(frozen=True)
class Libraries:
    """What torch.backends.xeon.run_cpu can preload here, searched where it searches."""

    allocators: tuple[str, ...]  # besides "default"
    iomp: bool
    notes: tuple[str, ...] = ()


def launcher_library_dirs(env: Mapping[str, str]) -> list[Path]:
    dirs = [Path(env[v]) / "lib" for v in ("CONDA_PREFIX", "VIRTUAL_ENV") if env.get(v)]
    return dirs + [Path.home() / ".local" / "lib", *map(Path, ("/usr/local/lib", "/usr/local/lib64", "/usr/lib", "/usr/lib64"))]


def find_libraries(env: Mapping[str, str]) -> Libraries:
    dirs = launcher_library_dirs(env)

    def found(lib: str) -> bool:
        return any(glob.glob(str(d / f"lib{lib}.so")) for d in dirs)

    allocators = tuple(a for a in ("jemalloc", "tcmalloc") if found(a))
    notes = [f"{a}: not found as lib{a}.so in {', '.join(map(str, dirs))}; not offered "
             f"(Debian: apt-get install libjemalloc2 libtcmalloc-minimal4, then link the .so into $VIRTUAL_ENV/lib)"
             for a in ("jemalloc", "tcmalloc") if a not in allocators]
    iomp = found("iomp5")
    if not iomp:
        notes.append("Intel OpenMP (libiomp5.so) not found: only GNU OpenMP offered (pip install intel-openmp)")
    notes.append("ONNX Runtime here is not an OpenMP build: the OpenMP knob can only matter through "
                 "torch/numpy code in the worker, and the importance report shows whether it did")
    return Libraries(allocators, iomp, tuple(notes))


def search_space(cores: int, ratios: Sequence[float], libraries: Libraries,
                 max_workers: int = 4) -> dict[str, tuple]:
    """Every knob and its choices for a box with `cores` physical cores."""
    sizes = [k for k in (1, 2, 4, 8, 16, 32) if k < cores]
    return {
        "workers": tuple(w for w in (1, 2, 4, 8) if w <= min(cores, max_workers)),
        "core_groups": ("numa", "socket", *(f"size:{k}" for k in sizes)),
        "cpu_head_groups": (0, 1),
        "spinning": (False, True),
        "micro_batch": (0, 1, 2, 4),
        "batchSize": (1, 2, 4, 8, 16),
        "maxBatchDelay": (0, 2, 5, 10, 20, 50),
        "ratio": tuple(sorted({*ratios, WHOLE_MODEL})),
        "allocator": ("default", *libraries.allocators),
        "openmp": ("gnu", "intel") if libraries.iomp else ("gnu",),
    }


def shipped_defaults(model_config: Mapping[str, Any], default_ratio: float | None,
                     properties: Mapping[str, str]) -> dict[str, Any]:
    """The knobs as the archive and config/config.properties ship them: the tuner's trial 0."""
    section = model_config.get("hetserve") or {}
    args = properties.get("cpu_launcher_args", "").split()
    allocator = next((a for a, flag in ALLOCATOR_FLAGS.items() if flag in args), "default")
    ratio = section.get("ratio") or default_ratio or WHOLE_MODEL
    return {
        "workers": int(model_config.get("minWorkers") or 1),
        "core_groups": section.get("core_groups") or "numa",
        "cpu_head_groups": int(section.get("cpu_head_groups") or 0),
        "spinning": bool(section.get("spinning") or False),
        "micro_batch": int(section.get("micro_batch") or 0),
        "batchSize": int(model_config.get("batchSize") or 1),
        "maxBatchDelay": int(model_config.get("maxBatchDelay") or 0),
        "ratio": float(ratio),
        "allocator": allocator,
        "openmp": "gnu" if "--disable-iomp" in args else "intel",
    }


def with_defaults(space: Mapping[str, tuple], defaults: Mapping[str, Any]) -> dict[str, tuple]:
    """The space with each shipped default added to its knob's choices (trial 0 must fit)."""
    return {k: v if defaults.get(k, v[0]) in v else (*v, defaults[k]) for k, v in space.items()}


def launcher_args(allocator: str, openmp: str) -> str:
    return ALLOCATOR_FLAGS[allocator] + (" --disable-iomp" if openmp == "gnu" else "")


@dataclass(frozen=True)
class Settings:
    model_overrides: dict[str, Any]  # merged into the archive's model-config.yaml
    properties: dict[str, str]  # config.properties keys

    @property
    def server_key(self) -> str:
        return json.dumps(self.properties, sort_keys=True)


def trial_settings(params: Mapping[str, Any]) -> Settings:
    w = int(params["workers"])
    section = {k: params[k] for k in ("ratio", "core_groups", "cpu_head_groups", "micro_batch", "spinning")}
    overrides = {"minWorkers": w, "maxWorkers": w, "batchSize": int(params["batchSize"]),
                 "maxBatchDelay": int(params["maxBatchDelay"]), "hetserve": section}
    return Settings(overrides, {"cpu_launcher_args": launcher_args(params["allocator"], params["openmp"])})


def apply_properties(text: str, overrides: Mapping[str, str]) -> str:
    """`text` (a config.properties) with each key's live line replaced; new keys appended."""
    lines, seen = [], set()
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if key in overrides and not line.lstrip().startswith("#"):
            lines.append(f"{key}={overrides[key]}")
            seen.add(key)
        else:
            lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items() if k not in seen]
    return "\n".join(lines) + "\n"


def write_winner(out_dir: Path, model_config: Mapping[str, Any], params: Mapping[str, Any],
                 base_properties: Path) -> tuple[Path, Path]:
    """model-config.yaml (the archive's, with the winning knobs) and config.properties."""
    from partitioner.archive import merge_config

    settings = trial_settings(params)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "model-config.yaml"
    config_path.write_text("# written by hetserve tune: the best trial's knobs over the archive's config\n"
                           + yaml.safe_dump(merge_config(model_config, settings.model_overrides), sort_keys=False))
    props_path = out_dir / "config.properties"
    props_path.write_text("# written by hetserve tune: config/config.properties with the best launcher settings\n"
                          + apply_properties(base_properties.read_text(), settings.properties))
    return config_path, props_path


# ---------------------------------------------------------------------------- the search


@dataclass
class TuneOptions:
    trials: int = 12
    objective: str = "max-rate"  # or "p99" (at `rate`)
    rate: float | None = None
    criteria: Criteria = field(default_factory=Criteria)
    start_rate: float = 5.0
    factor: float = 1.25
    max_rate: float = 1000.0
    refine: int = 1
    prune_fraction: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in ("max-rate", "p99"):
            raise ValueError(f"objective must be 'max-rate' or 'p99', got {self.objective!r}")
        if self.objective == "p99" and not self.rate:
            raise ValueError("the p99 objective needs --rate")
        if not 0 < self.prune_fraction <= 1:
            raise ValueError("prune_fraction must be in (0, 1]")


def measure_max_rate(at: PointRunner, options: TuneOptions, best: float | None,
                     on_point: Callable[[LoadResult], None] = lambda r: None) -> tuple[float, list[LoadResult], bool]:
    """-> (highest sustained rate, points, pruned). Starts at prune_fraction x `best` when there
    is a best: failing that first point prunes the trial."""
    cache: dict[float, LoadResult] = {}

    def run(rate: float) -> LoadResult:
        if rate not in cache:
            cache[rate] = at(rate)
            on_point(cache[rate])
        return cache[rate]

    start = max(options.start_rate, (best or 0.0) * options.prune_fraction)
    first = run(start)
    if not sustains(first, options.criteria) and best:
        return 0.0, list(cache.values()), True
    if not sustains(first, options.criteria):
        # no best yet (trial 0 failed its first rate): look below it once instead of giving up
        lower = run(start / 4)
        return (offered_rate(lower) if sustains(lower, options.criteria) else 0.0), list(cache.values()), False
    # two failures in a row end the climb: on a shared box one noisy point must not (seen: a
    # default that held 63 req/s scored 34 when a single point at 38 req/s missed its p99)
    sweep = sweep_rates(run, start, max_rate=options.max_rate, factor=options.factor,
                        stop_after_failures=2, refine_steps=options.refine, criteria=options.criteria)
    return sweep.knee_rate or 0.0, list(sweep.points), False


def p99_value(result: LoadResult, criteria: Criteria, timeout_ms: float) -> float:
    """p99 at the fixed rate; a run with too many errors scores the timeout (worse than any p99)."""
    p99 = criteria.stats(result).p99
    if p99 is None or result.error_rate > criteria.max_error_rate:
        return timeout_ms
    return p99


def suggest(trial, space: Mapping[str, tuple]) -> dict[str, Any]:
    return {name: trial.suggest_categorical(name, list(choices)) for name, choices in space.items()}


def run_study(space: Mapping[str, tuple], prepare: Prepare, options: TuneOptions,
              defaults: Mapping[str, Any] | None = None, log: Callable[[str], None] = print,
              timeout_ms: float = 10_000.0):
    """The optuna study: trial 0 is `defaults` (when given), then TPE. Returns the study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    maximize = options.objective == "max-rate"
    sampler = optuna.samplers.TPESampler(seed=options.seed, n_startup_trials=max(2, min(5, options.trials // 3)),
                                         multivariate=True)
    study = optuna.create_study(direction="maximize" if maximize else "minimize", sampler=sampler)
    if defaults:
        study.enqueue_trial(dict(defaults), user_attrs={"role": "shipped default"})
    seen: dict[str, float | None] = {}  # None: pruned
    started = time.monotonic()

    def objective(trial) -> float:
        params = suggest(trial, space)
        key = json.dumps(params, sort_keys=True)
        if key in seen:  # TPE proposes repeats in small categorical spaces: do not measure twice
            trial.set_user_attr("repeat_of_measured", True)
            if seen[key] is None:
                trial.report(0.0, step=0)
                raise optuna.TrialPruned()
            return seen[key]
        t0 = time.monotonic()
        log(f"trial {trial.number}: {_short(params)}")
        try:
            with prepare(params) as at:
                if maximize:
                    best = study.best_value if _completed(study) else None
                    value, points, pruned = measure_max_rate(
                        at, options, best, on_point=lambda r: log(f"    {_point(r)}"))
                else:
                    points = [at(options.rate)]
                    log(f"    {_point(points[0])}")
                    value, pruned = p99_value(points[0], options.criteria, timeout_ms), False
        except TrialFailed as exc:
            log(f"  trial {trial.number} failed: {exc}")
            trial.set_user_attr("error", str(exc)[-2000:])
            seen[key] = 0.0 if maximize else timeout_ms
            return seen[key]
        trial.set_user_attr("points", [_point_json(r) for r in points])
        trial.set_user_attr("seconds", round(time.monotonic() - t0, 1))
        if pruned:
            seen[key] = None
            trial.report(0.0, step=0)
            log(f"  trial {trial.number} pruned: cannot sustain {options.prune_fraction:.0%} of the best "
                f"({time.monotonic() - started:.0f} s in)")
            raise optuna.TrialPruned()
        seen[key] = value
        log(f"  trial {trial.number}: {value:.1f} {'req/s' if maximize else 'ms p99'} "
            f"({time.monotonic() - t0:.0f} s; {time.monotonic() - started:.0f} s into the study)")
        return value

    study.optimize(objective, n_trials=options.trials)
    return study


def _completed(study) -> bool:
    import optuna

    return any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def _short(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _point(r: LoadResult) -> str:
    p99 = r.latency_all_ms.p99
    return (f"{r.target_rate or 0:7.1f} req/s -> {r.throughput_rps:6.1f} served, p99 "
            f"{p99 if p99 is not None else float('nan'):7.1f} ms, errors {r.errors or 0}")


def _point_json(r: LoadResult) -> dict:
    return {"rate": r.target_rate, "served": r.throughput_rps, "p50_ms": r.latency_all_ms.p50,
            "p99_ms": r.latency_all_ms.p99, "errors": r.errors}


# ---------------------------------------------------------------------------- the report


def main_effects(rows: Sequence[tuple[Mapping[str, Any], float]]) -> dict[str, dict]:
    """Per knob: mean objective per value, and the share of the objective's variance those
    means explain (eta squared, a one-way ANOVA per knob). Plain, and readable with few trials."""
    values = [v for _, v in rows]
    if len(values) < 2:
        return {}
    grand = sum(values) / len(values)
    total = sum((v - grand) ** 2 for v in values)
    out = {}
    for knob in rows[0][0]:
        groups: dict[str, list[float]] = {}
        for params, v in rows:
            groups.setdefault(json.dumps(params[knob]), []).append(v)
        between = sum(len(g) * (sum(g) / len(g) - grand) ** 2 for g in groups.values())
        out[knob] = {
            "eta_squared": between / total if total > 0 else 0.0,
            "values_tried": len(groups),
            "mean_by_value": {k: {"mean": sum(g) / len(g), "trials": len(g)} for k, g in groups.items()},
        }
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["eta_squared"]))


def study_report(study, options: TuneOptions, space: Mapping[str, tuple], libraries: Libraries | None = None) -> dict:
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    measured = [t for t in done if not t.user_attrs.get("repeat_of_measured")]
    default = next((t for t in done if t.user_attrs.get("role") == "shipped default"), None)
    try:
        importance = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        importance_note = "optuna PED-ANOVA over the completed trials"
    except Exception as exc:  # noqa: BLE001 - too few or too uniform trials: say so, keep the report
        importance, importance_note = {}, f"PED-ANOVA not computable: {exc}"
    best = study.best_trial if done else None
    maximize = options.objective == "max-rate"
    gain = None
    if best is not None and default is not None and default.value:
        gain = best.value / default.value if maximize else default.value / best.value
    return {
        "objective": options.objective, "rate": options.rate, "criteria": asdict(options.criteria),
        "options": {k: v for k, v in asdict(options).items() if k != "criteria"},
        "space": {k: list(v) for k, v in space.items()},
        "libraries": asdict(libraries) if libraries else None,
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                    **t.user_attrs} for t in study.trials],
        "default": {"value": default.value, "params": default.params} if default else None,
        "best": {"number": best.number, "value": best.value, "params": best.params} if best else None,
        "gain_over_default": gain,
        "importance": {"ped_anova": importance, "note": importance_note,
                       "main_effects": main_effects([(t.params, t.value) for t in measured])},
        "counts": {state: sum(t.state.name == state for t in study.trials) for state in ("COMPLETE", "PRUNED", "FAIL")},
    }


def report_markdown(report: dict) -> str:
    unit = "req/s" if report["objective"] == "max-rate" else "ms p99"
    lines = [f"# hetserve tune: {report['objective']} (p99 target {report['criteria']['p99_ms']:g} ms)", ""]
    if report["default"] and report["best"]:
        gain = report["gain_over_default"]
        lines += [f"shipped default: **{report['default']['value']:.1f} {unit}**; best (trial "
                  f"{report['best']['number']}): **{report['best']['value']:.1f} {unit}**; gain "
                  f"**{gain:.2f}x**" if gain else "gain: n/a", ""]
    lines += ["| trial | state | value | " + " | ".join(report["space"]) + " |",
              "|---|---|---|" + "---|" * len(report["space"])]
    for t in report["trials"]:
        value = "-" if t["value"] is None or t["state"] != "COMPLETE" else f"{t['value']:.1f}"
        lines.append(f"| {t['number']} | {t['state'].lower()} | {value} | "
                     + " | ".join(str(t["params"].get(k, "")) for k in report["space"]) + " |")
    measured = sum(t["state"] == "COMPLETE" and not t.get("repeat_of_measured") for t in report["trials"])
    lines += ["", f"Knob importance over the {measured} completed, measured trials (PED-ANOVA; eta^2 = share of "
              "the objective's variance explained by the knob's main effect). With few trials, knobs that "
              "always changed together share the credit: read eta^2 with the values-tried column.", "",
              "| knob | PED-ANOVA | eta^2 | values tried |", "|---|---|---|---|"]
    effects = report["importance"]["main_effects"]
    for knob in report["space"]:
        ped = report["importance"]["ped_anova"].get(knob)
        eff = effects.get(knob, {})
        lines.append(f"| {knob} | {'-' if ped is None else f'{ped:.3f}'} | "
                     f"{eff.get('eta_squared', 0):.3f} | {eff.get('values_tried', 0)} |")
    if report.get("libraries"):
        lines += ["", *[f"- {n}" for n in report["libraries"]["notes"]]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- live trials


def sample_shape(manifest: Manifest) -> tuple[int, ...]:
    spec = manifest.inputs[0]
    if spec.dtype != "float32" or any(d is None for d in spec.sample_shape):
        raise ValueError("the tuner sends float32 tensors of a fixed sample shape; this model's input is "
                         f"{spec.dtype} {list(spec.shape)}")
    return (1, *spec.sample_shape)


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
        yield point_runner(target, duration=self.duration, warmup=self.warmup, arrival="poisson",
                           timeout=self.timeout, log=lambda _: None)

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


def physical_cores() -> int:
    from handlers.hardware.topology import probe

    return len(probe().cores)


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
    props = dict(line.split("=", 1) for line in base_properties.read_text().splitlines()
                 if "=" in line and not line.lstrip().startswith("#"))
    defaults = shipped_defaults(archive.model_config, archive.manifest.default_ratio, props)
    ratios = [p.ratio for p in archive.manifest.partitions]
    space = with_defaults(search_space(physical_cores(), ratios, libraries), defaults)
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
        log(f"== {label}: {_short(params)}")
        harness = LiveHarness(mar, work / label, log=log, **harness_options)
        try:
            with harness.prepare(params) as at:
                value, points, _ = measure_max_rate(at, options, None, on_point=lambda r: log(f"    {_point(r)}"))
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
