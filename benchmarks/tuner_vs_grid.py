"""The tuner against brute force (issue 19, item 3): ResNet-18, one run, side by side.

A grid over workers, core grouping, batchSize, maxBatchDelay, micro-batch and ratio, every point
measured exactly as the tuner measures a trial (`hetserve.tuner.LiveHarness.prepare`: the point's
archive variant registered afresh, so fresh worker processes and ORT sessions, on the harness's
one warm TorchServe; then `hetserve.tuner.measure_trial`); its best configuration with
p99 <= --p99-ms; then `hetserve tune`'s study over the same space with at most a quarter of the
grid's trials; then the tuner's pick and the grid's best re-measured back to back, alternating
(best-pick, pick-best, ...) for --confirm-rounds rounds, because the grid's best is the maximum of
many noisy measurements and reads high. The headline `pick_over_best` is median(pick rounds) /
median(best rounds); when the pick is the grid's best configuration it is 1.0 by construction and
the rounds are still measured, their ratio showing the noise.

Measurement (both sides, the same --duration): the tuner's `goodput` objective
(`hetserve.tuner.goodput_value`), one closed loop of --concurrency clients for --duration s (after
--warmup s) per configuration, scored 2xx/s x min(1, --p99-ms / p99), p99 over every request
(errors and timeouts included); 0 if more than 1% fail or none succeeds. A p99 a few percent over
the budget costs a few percent of the score, not all of it. One point per configuration is what
fits: a knee sweep costs 5-8 points per configuration.

The space (2-core box; defaults from config/ first): workers 1|2 (one process on both cores, or one
per core), core_groups numa|size:1 (one 2-core group, or one group per core), ratio = the archive's
cut (0.8) | 1.0 (whole model), batchSize 4|1, maxBatchDelay 5|20 ms, micro_batch 0|2. Of the 64
names only 19 configurations differ (`hetserve.tuner.canonical`: a one-core worker has one group
whatever the policy, a split model on one 2-core group is split into two 1-core groups anyway, a
batch of one neither waits nor splits, micro-batches on one executor only run in series), so
the grid is 19 points and the tuner gets 4 trials. Values: batchSize 8 would not fill from 8
closed-loop clients on one worker, and more values per axis would not fit the time budget.

Time: a point costs the unregistration of the previous variant and the new workers' start
(Python imports in the launcher and the worker, ORT sessions, calibration: ~13 s per point in the
2026-12-01 run at load average ~2) plus --trial-warmup, --warmup and --duration (1 + 1 + 6 s);
19 grid points, 4 tuner trials and 2 x 3 back-to-back points (29), plus one TorchServe start with
its JVM warm-up and the archive build (once per --store): ~21 s + 29 x ~21 s, about 10 min.

    python benchmarks/tuner_vs_grid.py            # the full run: ~10 min (estimated from the last run's phases)
    python benchmarks/tuner_vs_grid.py --quick    # resnet18-tiny, 3 points, 1 trial, 1 round: ~1-2 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hetserve.knee import Criteria
from hetserve.tuner import (
    TrialFailed,
    TuneOptions,
    canonical,
    config_key,
    grid_points,
    measure_trial,
)

REPO = Path(__file__).resolve().parent.parent
GOAL_RATIO = 0.97
GOAL_TRIALS = 0.25
KNOBS = ("workers", "core_groups", "ratio", "batchSize", "maxBatchDelay", "micro_batch")
SHORT = {"workers": "w", "core_groups": "groups", "ratio": "ratio", "batchSize": "batch", "maxBatchDelay": "delay",
         "micro_batch": "mb"}


def comparison_space(defaults: Mapping[str, Any], split_ratio: float, quick: bool = False) -> dict[str, tuple]:
    """The searched values, each knob's shipped default first (product order puts it at grid
    point 0); the knobs this comparison does not vary keep their default."""
    axes: dict[str, tuple] = {"workers": (1, 2), "core_groups": ("numa", "size:1"), "ratio": (split_ratio, 1.0),
                              "batchSize": (4, 1), "maxBatchDelay": (5, 20), "micro_batch": (0, 2)}
    if quick:
        axes = {"core_groups": axes["core_groups"], "ratio": axes["ratio"]}
    space = {k: (v,) for k, v in defaults.items()}
    for knob, values in axes.items():
        space[knob] = tuple(dict.fromkeys((defaults[knob], *values)))  # default first, no repeats
    return space


def pick_and_best(grid_rows: Sequence[Mapping[str, Any]], trials: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The grid's best row, the tuner's pick (its best measured trial) and the ratios, from plain
    rows ({"params", "value"}) and trials ({"config", "value", "repeat_of_measured"?})."""
    best = max(grid_rows, key=lambda r: r["value"])
    measured = [t for t in trials if not t.get("repeat_of_measured") and t.get("value") is not None]
    pick = max(measured, key=lambda t: t["value"])
    by_key = {config_key(r["params"]): r for r in grid_rows}
    pick_row = by_key.get(config_key(pick["config"]))
    return {
        "grid_best": {"params": best["params"], "value": best["value"]},
        "pick": {"params": pick["config"], "value_in_search": pick["value"],
                 "value_in_grid": pick_row["value"] if pick_row else None},
        "same_configuration": config_key(pick["config"]) == config_key(best["params"]),
        "pick_over_best_search": pick["value"] / best["value"] if best["value"] else None,
        "pick_over_best_grid": (pick_row["value"] / best["value"]) if pick_row and best["value"] else None,
        "trials_measured": len(measured),
        "trials_ratio": len(measured) / len(grid_rows),
    }


def confirmed_ratio(pick_values: Sequence[float], best_values: Sequence[float]) -> float | None:
    """median(pick) / median(best) over the back-to-back re-measurements: one bad round (a
    neighbour's burst on the shared cores) moves a median of three not at all. None without
    values or with a best median of 0."""
    if not pick_values or not best_values:
        return None
    best = statistics.median(best_values)
    return statistics.median(pick_values) / best if best > 0 else None


def confirm_order(round_index: int) -> tuple[str, str]:
    """Which of the two goes first in a back-to-back round: alternating, so a drift in the box's
    load hits both sides alike over the rounds."""
    return ("best", "pick") if round_index % 2 == 0 else ("pick", "best")


def headline_ratio(same_configuration: bool, confirmed: float | None, grid_ratio: float | None) -> tuple[float | None, str]:
    """(pick_over_best, where it comes from): 1.0 when the tuner picked the grid's best
    configuration (its re-measurements then show only the noise), else the back-to-back medians'
    ratio, else (no rounds) the grid's own values."""
    if same_configuration:
        return 1.0, "same configuration (1.0 by construction; the rounds show the noise)"
    if confirmed is not None:
        return confirmed, "back-to-back re-measurement (ratio of the medians)"
    return grid_ratio, "grid values"


# ---------------------------------------------------------------------------- live


def measure_point(harness, params: Mapping[str, Any], options: TuneOptions, log: Callable[[str], None]) -> dict:
    """One configuration, the tuner's way: a fresh registration, then the objective's protocol."""
    t0 = time.monotonic()
    row: dict[str, Any] = {"params": dict(params)}
    try:
        with harness.prepare(params) as at:
            value, points, _ = measure_trial(at, options, None, harness.timeout * 1000)
        result = points[0]
        row.update(value=value, goodput_rps=result.goodput_rps, p50_ms=result.latency_all_ms.p50,
                   p99_ms=result.latency_all_ms.p99, errors=result.errors, generator_cpu_pct=result.cpu_pct,
                   point=json.loads(result.to_json()))
    except TrialFailed as exc:
        row.update(value=0.0, error=str(exc)[-2000:])
    row["seconds"] = round(time.monotonic() - t0, 1)
    log(f"  {row['value']:6.1f} ok/s  p99 {row.get('p99_ms') or float('nan'):7.1f} ms  ({row['seconds']:.0f} s)  "
        + " ".join(f"{k}={params[k]}" for k in KNOBS))
    return row


def numa_nodes() -> int:
    from handlers.hardware.topology import probe

    return len(probe().numa_nodes)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    from handlers.artifact.contract import read_archive
    from handlers.hardware.topology import usable_cores
    from hetserve.benchmarking.harness import hetserve_archive
    from hetserve.machine import machine_info, run_record
    from hetserve.properties import read_properties
    from hetserve.tsprocess import BASE_CONFIG
    from hetserve.tuner import LiveHarness, run_study, shipped_defaults

    started, load_start = time.monotonic(), os.getloadavg()
    record = run_record()
    log(f"archive {args.model} at ratio {args.ratio:g} in {args.store} (reused if there)")
    mar = hetserve_archive(args.store, args.model, f"zoo:{args.model}", "--ratios", str(args.ratio),
                           "--allow-off-target")  # ResNet-18's coarse graph may miss 0.8 by > 0.03
    archive = read_archive(mar)
    defaults = shipped_defaults(archive.model_config, archive.manifest.default_ratio, read_properties(BASE_CONFIG))
    split = min((p.ratio for p in archive.manifest.partitions if p.ratio < 1.0),
                key=lambda r: abs(r - args.ratio))
    space = comparison_space(defaults, split, args.quick)
    cores, nodes = usable_cores(), numa_nodes()
    grid = grid_points(space, cores, nodes)
    budget = max(1, int(len(grid) * GOAL_TRIALS))
    criteria = Criteria(p99_ms=args.p99_ms)
    options = TuneOptions(trials=budget, objective="goodput", search=args.search, concurrency=args.concurrency,
                          criteria=criteria, seed=args.seed)
    log(f"{len(grid)} grid points, tuner budget {budget} trials ({args.search}); "
        f"{cores} cores, {nodes} NUMA node(s); load average {load_start}")
    harness = LiveHarness(mar, args.work, duration=args.duration, warmup=args.warmup, jvm_warmup=args.jvm_warmup,
                          trial_warmup=args.trial_warmup, log=log)
    if args.fresh_jvm:  # every point (grid, trial, re-measurement) on a TorchServe of its own
        registered = harness.prepare

        def prepare(params):
            harness.close()
            return registered(params)

        harness.prepare = prepare
    phases: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        log("== grid")
        rows = []
        points_left = len(grid) + budget + 2 * args.confirm_rounds
        for i, params in enumerate(grid):
            rows.append({"index": i, **measure_point(harness, params, options, log)})
            if i >= 1:  # point 0 paid the TorchServe start: project from the later ones
                per_point = (time.monotonic() - t0 - rows[0]["seconds"]) / i
                log(f"  [{i + 1}/{len(grid)}] ~{per_point:.0f} s per point: about "
                    f"{(time.monotonic() - started + per_point * (points_left - i - 1)) / 60:.1f} min in all")
        phases["grid_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        log(f"== tuner ({budget} trials)")
        study = run_study(space, harness.prepare, options, defaults=defaults, log=log,
                          timeout_ms=harness.timeout * 1000, canon=lambda p: canonical(p, space, cores, nodes))
        phases["tuner_s"] = round(time.monotonic() - t0, 1)
        trials = [{"number": t.number, "state": t.state.name, "value": t.value, **t.user_attrs} for t in study.trials]
        summary = pick_and_best(rows, trials)
        confirm: dict[str, Any] = {"rounds": 0, "pick": [], "best": [], "each_round": []}
        if args.confirm_rounds > 0:
            t0 = time.monotonic()
            same = " (the same configuration: the rounds show the noise)" if summary["same_configuration"] else ""
            log(f"== back to back, {args.confirm_rounds} round(s): grid best vs tuner pick{same}")
            for i in range(args.confirm_rounds):
                this_round: dict[str, Any] = {"order": list(confirm_order(i))}
                for label in confirm_order(i):
                    params = summary["grid_best" if label == "best" else "pick"]["params"]
                    row = measure_point(harness, params, options, log)
                    confirm[label].append(row["value"])
                    this_round[label] = {k: row.get(k) for k in ("value", "goodput_rps", "p50_ms", "p99_ms", "errors")}
                confirm["each_round"].append(this_round)
            confirm["rounds"] = args.confirm_rounds
            phases["confirm_s"] = round(time.monotonic() - t0, 1)
    finally:
        harness.close()
    confirmed = confirmed_ratio(confirm["pick"], confirm["best"])
    headline, source = headline_ratio(summary["same_configuration"], confirmed, summary["pick_over_best_grid"])
    result = {
        **record, "machine": machine_info(), "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()), "seconds": round(time.monotonic() - started, 1), "phases": phases,
        "model": args.model, "archive": str(mar), "quick": args.quick,
        "protocol": {"objective": "goodput", "concurrency": args.concurrency, "duration_s": args.duration,
                     "warmup_s": args.warmup, "trial_warmup_s": args.trial_warmup, "jvm_warmup_s": args.jvm_warmup,
                     "criteria": asdict(criteria),
                     "score": ("2xx/s x min(1, p99_ms budget / p99 of all requests); 0 if more than "
                               "max_error_rate fail or none succeeds (hetserve.tuner.goodput_value)"),
                     "confirm": (f"{args.confirm_rounds} back-to-back rounds, order alternating (best-pick, "
                                 "pick-best, ...); pick_over_best = median(pick) / median(best)"),
                     "each point": ("a new TorchServe of hetserve.tuner.LiveHarness serving its archive variant"
                                    if args.fresh_jvm else "its archive variant registered afresh (new workers) on "
                                    "the one warm TorchServe of hetserve.tuner.LiveHarness")
                                   + ", then hetserve.tuner.measure_trial"},
        "space": {k: list(v) for k, v in space.items()}, "defaults": defaults,
        "grid": {"size": len(grid), "rows": rows},
        "tuner": {"search": args.search, "budget": budget, "seed": args.seed, "trials": trials},
        **summary,
        "confirm": {**confirm, "median_pick": statistics.median(confirm["pick"]) if confirm["pick"] else None,
                    "median_best": statistics.median(confirm["best"]) if confirm["best"] else None,
                    "pick_over_best": confirmed},
        "pick_over_best": headline,
        "pick_over_best_source": source,
        "goal": {"pick_over_best": GOAL_RATIO, "trials_ratio": GOAL_TRIALS,
                 "met": bool(headline is not None and headline >= GOAL_RATIO and summary["trials_ratio"] <= GOAL_TRIALS)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    log(f"grid best {summary['grid_best']['value']:.1f} ok/s; tuner pick {summary['pick']['value_in_search']:.1f} "
        f"in search; pick/best {headline if headline is not None else float('nan'):.3f} ({result['pick_over_best_source']}) "
        f"with {summary['trials_measured']}/{len(grid)} trials; wrote {args.out} ({result['seconds']:.0f} s)")
    if args.png:
        plot(result, args.png)
        log(f"wrote {args.png}")
    return result


def plot(result: Mapping[str, Any], path: Path) -> Path | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = sorted(result["grid"]["rows"], key=lambda r: r["value"])
    picked = {config_key(t["config"]) for t in result["tuner"]["trials"] if "config" in t}
    best = result["grid_best"]["value"]
    fig = Figure(figsize=(8, 0.28 * len(rows) + 1.6), layout="tight")
    ax = fig.subplots()
    labels = [" ".join(f"{SHORT[k]}={r['params'][k]}" for k in KNOBS) for r in rows]
    colors = ["C1" if config_key(r["params"]) in picked else "C0" for r in rows]
    ax.barh(range(len(rows)), [r["value"] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.axvline(GOAL_RATIO * best, color="grey", ls=":", lw=1, label=f"{GOAL_RATIO:g} x grid best")
    ax.set_xlabel(f"ok/s x min(1, {result['protocol']['criteria']['p99_ms']:g} ms / p99), "
                  f"{result['protocol']['concurrency']} closed-loop clients")
    ratio = result["pick_over_best"]
    ax.set_title(f"{result['model']}: grid ({result['grid']['size']} points) vs tuner "
                 f"({result['trials_measured']} trials, orange); pick/best "
                 f"{ratio if ratio is not None else float('nan'):.3f}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")  # bars sorted ascending: the shortest is at the bottom
    fig.savefig(path, dpi=120)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="resnet18-tiny, a 3-point grid, short points")
    p.add_argument("--model", help="zoo model (default resnet18; --quick: resnet18-tiny)")
    p.add_argument("--ratio", type=float, help="the archive's cut (default 0.8; --quick: 0.5)")
    p.add_argument("--store", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-tvg" / "store")
    p.add_argument("--work", type=Path, default=None, help="scratch for variants and server logs")
    p.add_argument("--out", type=Path, help="default benchmarks/results/tuner_vs_grid.json (--quick: a temp file)")
    p.add_argument("--png", type=Path, help="default next to --out")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float,
                   help="measured seconds per point, grid, trials and rounds alike (default 6; --quick 2)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds per point (default 1; --quick 0.5)")
    p.add_argument("--trial-warmup", type=float, help="load after each registration (default 1; --quick 0.5)")
    p.add_argument("--jvm-warmup", type=float, help="load after the TorchServe start (default 10; --quick 3)")
    p.add_argument("--p99-ms", type=float, default=500.0)
    p.add_argument("--search", choices=("local", "tpe"), default="local", help="the tuner's search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh-jvm", action="store_true",
                   help="a new TorchServe (and --jvm-warmup) for every point: about twice the time")
    p.add_argument("--confirm-rounds", type=int,
                   help="back-to-back rounds of pick and best, medians compared (default 3; --quick 1)")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, short in (("model", "resnet18", "resnet18-tiny"), ("ratio", 0.8, 0.5), ("duration", 6.0, 2.0),
                              ("warmup", 1.0, 0.5), ("trial_warmup", 1.0, 0.5), ("jvm_warmup", 10.0, 3.0),
                              ("confirm_rounds", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.out = args.out or (Path(tempfile.gettempdir()) / "tuner_vs_grid_quick.json" if quick
                            else REPO / "benchmarks" / "results" / "tuner_vs_grid.json")
    args.png = args.png or args.out.with_suffix(".png")
    args.work = args.work or Path(tempfile.mkdtemp(prefix="hetserve-tvg-"))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
