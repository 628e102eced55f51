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

Small budgets (a handful of trials over a space a brute-force grid covers in a few dozen): every
proposal can first be mapped to its canonical configuration (`canonical`: knobs that cannot
change what runs, such as maxBatchDelay at batchSize 1 or the grouping policy of a one-core
worker, take one fixed value), so no trial re-measures a configuration under another name,
and `search="local"` replaces TPE's random start-up by a coordinate search from the shipped
default: each trial changes one knob of the best configuration so far, in `LOCAL_ORDER` (workers,
maxBatchDelay, ratio, then the rest). With 4-6 trials TPE has no model yet and samples at
random; the default, which sits near the ceiling, is the better prior.

`objective="goodput"` scores a trial by one closed-loop run at `concurrency` clients:
2xx/s x min(1, p99 target / p99), 0 when more than `max_error_rate` fail or nothing succeeds
(`goodput_value`). The score degrades smoothly past the target instead of a 0/1 cliff: with 8
closed-loop clients a 2-core box sits at p99 270-600 ms, so a hard threshold let p99 noise of a
few percent decide between a configuration's full throughput and 0. One measurement per trial,
what a time-boxed comparison against a full grid can afford.
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

from handlers.artifact.contract import WHOLE_MODEL, read_archive, serves_split
from handlers.artifact.manifest import Manifest
from handlers.hardware.topology import Core, Topology, plan_groups, usable_cores, worker_core_count
from handlers.runtime.config import RuntimeConfig
from hetserve.knee import Criteria, offered_rate, sustains, sweep_rates
from hetserve.loadgen import LoadResult
from hetserve.properties import merge_properties, read_properties
from partitioner.auto_workers import workers_here

# model-config.yaml keys (top level or hetserve.*) and the launcher's, per knob
MODEL_KNOBS = ("workers", "batchSize", "maxBatchDelay", "ratio", "core_groups", "cpu_head_groups",
               "micro_batch", "spinning")
SERVER_KNOBS = ("allocator", "openmp")
ALLOCATOR_FLAGS = {"default": "--use-default-allocator", "jemalloc": "--enable-jemalloc",
                   "tcmalloc": "--enable-tcmalloc"}
OBJECTIVES = ("max-rate", "p99", "goodput")
# the local search's knob order: processes first, then how long a worker waits to fill a batch,
# then what runs (whole model or split) and the executors, then the rest; a knob the space fixes is
# skipped. maxBatchDelay comes right after workers because the worker count sets each worker's
# share of the arrivals (8 clients over 2 workers: about batchSize 4 each, so a 5 ms gather
# dispatches partial batches), while on one-core workers a split model runs head and tail on the
# same core and ratio moves little. Recorded grid (benchmarks/results/tuner_vs_grid.json,
# ResNet-18, 2 cores): at 2 workers maxBatchDelay 20 vs 5 averaged +11% over both ratios, ratio
# 0.8 vs 1.0 -1% at 5 ms and +7% at 20 ms; with the old order (ratio first) 4 trials never reached
# 2 workers with a 20 ms delay, the grid's best class.
LOCAL_ORDER = ("workers", "maxBatchDelay", "ratio", "core_groups", "batchSize", "micro_batch",
               "cpu_head_groups", "spinning", "allocator", "openmp")

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
    config = RuntimeConfig.from_model_yaml(model_config)
    args = properties.get("cpu_launcher_args", "").split()
    allocator = next((a for a, flag in ALLOCATOR_FLAGS.items() if flag in args), "default")
    ratio = config.ratio if config.ratio is not None else default_ratio or WHOLE_MODEL
    return {
        "workers": workers_here(model_config.get("minWorkers")),
        "core_groups": config.core_groups,
        "cpu_head_groups": config.cpu_head_groups,
        "spinning": config.spinning,
        "micro_batch": config.micro_batch,
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
                          + merge_properties(base_properties.read_text(), settings.properties))
    return config_path, props_path


# ---------------------------------------------------------------------------- canonical configurations


def even_topology(cores: int, nodes: int = 1) -> Topology:
    """A box of `cores` cores spread evenly over `nodes` NUMA nodes, one socket each."""
    node_of = [i for i in range(min(nodes, cores)) for _ in range(cores // nodes + (i < cores % nodes))]
    return Topology(tuple(Core(cpu, (cpu,), cpu, node, node) for cpu, node in enumerate(node_of)))


def group_sizes(policy: str, worker_cores: int, nodes: int = 1, min_groups: int = 1) -> tuple[int, ...]:
    """Cores per core group one worker gets: the runtime's `plan_groups` on a worker of
    `worker_cores` cores spread evenly over `nodes` NUMA nodes (sockets = nodes here)."""
    # More groups than cores cannot be had; asking for them would only log plan_groups' warning.
    groups = plan_groups(even_topology(worker_cores, nodes), policy, min_groups=min(min_groups, worker_cores))
    return tuple(sorted((len(g.cpus) for g in groups), reverse=True))


def executor_layout(params: Mapping[str, Any], cores: int, nodes: int = 1) -> tuple[int, ...]:
    """The core groups each worker runs (CPU only): the launcher's share of the cores per worker,
    and a split model (ratio < 1) needs two groups, so the runtime splits one if it can."""
    worker_cores = worker_core_count(cores, int(params["workers"]))
    split = serves_split(float(params["ratio"]), None)
    return group_sizes(str(params["core_groups"]), worker_cores, nodes, min_groups=2 if split else 1)


def _first(choices: Sequence, preferred: Any) -> Any:
    return preferred if preferred in choices else choices[0]


def canonical(params: Mapping[str, Any], space: Mapping[str, tuple], cores: int, nodes: int = 1) -> dict[str, Any]:
    """`params` with every knob that cannot change what runs (or, for micro_batch on one executor,
    can only slow it) set to one representative value, so two names for one configuration measure
    once (a grid of them has no duplicates):

    - core_groups: policies giving a worker the same groups (on 2 cores a one-core worker has one
      group whatever the policy; a split model on one 2-core group is split into two 1-core
      groups, as size:1 gives) take the first such policy in the space;
    - batchSize 1: maxBatchDelay (a batch of one never waits) and micro_batch (nothing to split);
    - one core group: micro_batch (micro-batches of one executor run one after another: they can
      only lose batching) and cpu_head_groups (nothing to reserve); a whole model (ratio 1):
      cpu_head_groups (no head/tail pipeline).

    CPU-only rules: on a GPU box the layout differs and only the batchSize rule holds.
    """
    p = dict(params)
    if "core_groups" in space and {"workers", "ratio"} <= p.keys():
        layout = executor_layout(p, cores, nodes)
        p["core_groups"] = next(c for c in space["core_groups"]
                                if executor_layout({**p, "core_groups": c}, cores, nodes) == layout)
        if len(layout) == 1:
            p["micro_batch"] = _first(space.get("micro_batch", (0,)), 0)
        if len(layout) == 1 or not serves_split(float(p["ratio"]), None):
            p["cpu_head_groups"] = _first(space.get("cpu_head_groups", (0,)), 0)
    if int(p.get("batchSize", 0)) == 1:
        p["maxBatchDelay"] = _first(space.get("maxBatchDelay", (0,)), 0)
        p["micro_batch"] = _first(space.get("micro_batch", (0,)), 0)
    return {k: p[k] for k in params}


def config_key(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(params), sort_keys=True)


def grid_points(space: Mapping[str, tuple], cores: int, nodes: int = 1) -> list[dict[str, Any]]:
    """Every distinct configuration of `space` (the product, canonicalised, duplicates dropped),
    in product order: what a brute-force search must measure."""
    import itertools

    names, seen, points = list(space), set(), []
    for combo in itertools.product(*(space[k] for k in names)):
        point = canonical(dict(zip(names, combo, strict=True)), space, cores, nodes)
        if config_key(point) not in seen:
            seen.add(config_key(point))
            points.append(point)
    return points


def propose_local(space: Mapping[str, tuple], measured: Sequence[tuple[Mapping[str, Any], float]],
                  canon: Callable[[Mapping[str, Any]], dict[str, Any]], maximize: bool = True,
                  order: Sequence[str] = LOCAL_ORDER) -> dict[str, Any] | None:
    """The next configuration of a coordinate search: the best measured one with a single knob
    changed (knobs in `order`, then the rest; values in the space's order), skipping what is
    already measured once canonicalised. None when every neighbour of the best is measured."""
    if not measured:
        return None
    best = (max if maximize else min)(measured, key=lambda row: row[1])[0]
    done = {config_key(canon(p)) for p, _ in measured}
    knobs = [k for k in order if k in space] + [k for k in space if k not in order]
    for knob in knobs:
        for value in space[knob]:
            candidate = canon({**best, knob: value})
            if config_key(candidate) not in done:
                return candidate
    return None


def goodput_value(result: LoadResult, criteria: Criteria) -> float:
    """A closed loop's score: 2xx/s x min(1, p99 target / p99). A p99 10% over the target costs
    about 9% of the score, not all of it (a noisy p99 must not decide the pick); 0 when more than
    `max_error_rate` of the requests fail or none succeeds."""
    p99 = criteria.stats(result).p99
    if p99 is None or result.ok == 0 or result.goodput_rps <= 0 or result.error_rate > criteria.max_error_rate:
        return 0.0
    return result.goodput_rps * min(1.0, criteria.p99_ms / p99) if p99 > 0 else result.goodput_rps


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
    search: str = "tpe"  # or "local": coordinate search from the default (small budgets)
    concurrency: int = 8  # clients of the goodput objective's closed loop

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.search not in ("tpe", "local"):
            raise ValueError(f"search must be 'tpe' or 'local', got {self.search!r}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
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


def measure_trial(at: PointRunner, options: TuneOptions, best: float | None, timeout_ms: float,
                  on_point: Callable[[LoadResult], None] = lambda r: None) -> tuple[float, list[LoadResult], bool]:
    """One trial's measurement on a prepared server -> (value, points, pruned): the objective's
    protocol, shared by the search and by anything compared with it (a brute-force grid)."""
    if options.objective == "max-rate":
        return measure_max_rate(at, options, best, on_point=on_point)
    if options.objective == "goodput":
        result = at.closed(options.concurrency)
        on_point(result)
        return goodput_value(result, options.criteria), [result], False
    result = at(options.rate)
    on_point(result)
    return p99_value(result, options.criteria, timeout_ms), [result], False


def run_study(space: Mapping[str, tuple], prepare: Prepare, options: TuneOptions,
              defaults: Mapping[str, Any] | None = None, log: Callable[[str], None] = print,
              timeout_ms: float = 10_000.0, seeds: Sequence[Mapping[str, Any]] = (),
              canon: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None):
    """The optuna study: trial 0 is `defaults` (when given), then `seeds`, then TPE, or with
    `options.search == "local"` the coordinate search (TPE once every neighbour of the best is
    measured). `canon` maps a proposal to its canonical configuration (identity by default): the
    configuration measured, and the key repeats are recognised by. Returns the study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    canon = canon or dict
    maximize = options.objective != "p99"
    sampler = optuna.samplers.TPESampler(seed=options.seed, n_startup_trials=max(2, min(5, options.trials // 3)),
                                         multivariate=True)
    study = optuna.create_study(direction="maximize" if maximize else "minimize", sampler=sampler)
    queue = ([(dict(defaults), "shipped default")] if defaults else []) + [(dict(s), "seed") for s in seeds]
    seen: dict[str, float | None] = {}  # canonical config -> value; None: pruned
    measured: list[tuple[dict[str, Any], float]] = []
    started = time.monotonic()

    def objective(trial) -> float:
        params = canon(suggest(trial, space))
        key = config_key(params)
        trial.set_user_attr("config", params)
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
                best = study.best_value if maximize and _completed(study) else None
                value, points, pruned = measure_trial(at, options, best, timeout_ms,
                                                      on_point=lambda r: log(f"    {_point(r)}"))
        except TrialFailed as exc:
            log(f"  trial {trial.number} failed: {exc}")
            trial.set_user_attr("error", str(exc)[-2000:])
            seen[key] = 0.0 if maximize else timeout_ms
            measured.append((params, seen[key]))
            return seen[key]
        trial.set_user_attr("points", [_point_json(r) for r in points])
        trial.set_user_attr("seconds", round(time.monotonic() - t0, 1))
        if pruned:
            seen[key] = None
            measured.append((params, 0.0))
            trial.report(0.0, step=0)
            log(f"  trial {trial.number} pruned: cannot sustain {options.prune_fraction:.0%} of the best "
                f"({time.monotonic() - started:.0f} s in)")
            raise optuna.TrialPruned()
        seen[key] = value
        measured.append((params, value))
        unit = {"max-rate": "req/s", "goodput": "ok/s"}.get(options.objective, "ms p99")
        log(f"  trial {trial.number}: {value:.1f} {unit} "
            f"({time.monotonic() - t0:.0f} s; {time.monotonic() - started:.0f} s into the study)")
        return value

    for _ in range(options.trials):
        if queue:
            params, role = queue.pop(0)
            study.enqueue_trial(params, user_attrs={"role": role})
        elif options.search == "local":
            proposal = propose_local(space, measured, canon, maximize)
            if proposal is not None:
                study.enqueue_trial(proposal, user_attrs={"role": "neighbour of the best"})
        study.optimize(objective, n_trials=1)
    return study


def _completed(study) -> bool:
    import optuna

    return any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def _short(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _point(r: LoadResult) -> str:
    p99 = r.latency_all_ms.p99
    load = f"{r.concurrency:4d} clients" if r.mode == "closed" else f"{r.target_rate or 0:7.1f} req/s"
    return (f"{load} -> {r.throughput_rps:6.1f} served, p99 "
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
    maximize = options.objective != "p99"
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
        "default": {"value": default.value, "params": _config(default)} if default else None,
        "best": {"number": best.number, "value": best.value, "params": _config(best)} if best else None,
        "gain_over_default": gain,
        "importance": {"ped_anova": importance, "note": importance_note,
                       "main_effects": main_effects([(_config(t), t.value) for t in measured])},
        "counts": {state: sum(t.state.name == state for t in study.trials) for state in ("COMPLETE", "PRUNED", "FAIL")},
    }


def _config(trial) -> dict[str, Any]:
    """What a trial measured: its canonical configuration (its raw params name the same one)."""
    return trial.user_attrs.get("config", trial.params)


def report_markdown(report: dict) -> str:
    unit = {"max-rate": "req/s", "goodput": "ok/s"}.get(report["objective"], "ms p99")
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
