"""The search: one trial's measurement (``measure_trial``: the objective's protocol, shared with
anything compared with the tuner) and the optuna study around it (``run_study``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hetserve.knee import Criteria, offered_rate, sustains, sweep_rates
from hetserve.loadgen import LoadResult
from hetserve.tuner.canonical import config_key, propose_local

OBJECTIVES = ("max-rate", "p99", "goodput")

PointRunner = Callable[[float], LoadResult]
# params -> context manager yielding a rate -> LoadResult function for a server set up for them
Prepare = Callable[[dict[str, Any]], contextlib.AbstractContextManager[PointRunner]]


class TrialFailed(RuntimeError):
    """The configuration could not be served (load error, worker crash): scored 0, not retried."""


def goodput_value(result: LoadResult, criteria: Criteria) -> float:
    """A closed loop's score: 2xx/s x min(1, p99 target / p99). A p99 10% over the target costs
    about 9% of the score, not all of it (a noisy p99 must not decide the pick); 0 when more than
    `max_error_rate` of the requests fail or none succeeds."""
    p99 = criteria.stats(result).p99
    if p99 is None or result.ok == 0 or result.goodput_rps <= 0 or result.error_rate > criteria.max_error_rate:
        return 0.0
    return result.goodput_rps * min(1.0, criteria.p99_ms / p99) if p99 > 0 else result.goodput_rps


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
        log(f"trial {trial.number}: {short_params(params)}")
        try:
            with prepare(params) as at:
                best = study.best_value if maximize and _completed(study) else None
                value, points, pruned = measure_trial(at, options, best, timeout_ms,
                                                      on_point=lambda r: log(f"    {point_line(r)}"))
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


def short_params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def point_line(r: LoadResult) -> str:
    p99 = r.latency_all_ms.p99
    load = f"{r.concurrency:4d} clients" if r.mode == "closed" else f"{r.target_rate or 0:7.1f} req/s"
    return (f"{load} -> {r.throughput_rps:6.1f} served, p99 "
            f"{p99 if p99 is not None else float('nan'):7.1f} ms, errors {r.errors or 0}")


def _point_json(r: LoadResult) -> dict:
    return {"rate": r.target_rate, "served": r.throughput_rps, "p50_ms": r.latency_all_ms.p50,
            "p99_ms": r.latency_all_ms.p99, "errors": r.errors}
