"""``hetserve`` command line: one entry point, one subcommand per job.

Subcommands import their heavy dependencies (torch, onnx) lazily so ``hetserve --help`` and the
serving-side commands stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("hetserve")


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratios must be numbers separated by commas, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one ratio")
    return values


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 3,224,224, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="zoo:NAME[?k=v&...], path/to/file.py:factory, or model.onnx")
    p.add_argument("--weights", help="weights for the model, .safetensors only (never pickle)")
    p.add_argument("--input-shape", type=_shape, help="sample shape without batch, e.g. 3,224,224 (factory returning a bare module)")
    p.add_argument("--ratios", type=_ratios, default=None, help="head shares of the cost, e.g. 0.75,0.8,0.85,0.9")
    p.add_argument("--tolerance", type=float, default=0.03, help="accepted distance from each ratio (default 0.03)")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds for the exact solver per cut")
    p.add_argument("--cost", choices=("profile", "flops"), default="profile", help="node cost source")
    p.add_argument("--profile-device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--profile-batch", type=int, default=1)
    p.add_argument("--profile-runs", type=int, default=10)
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("archive", help="export, profile, cut and pack a model into a .mar")
    _add_model_args(p)
    p.add_argument("--method", choices=("metis", "exact", "prefix"), default="metis")
    p.add_argument("--model-name", required=True)
    p.add_argument("--export-path", type=Path, default=Path("model_store"))
    p.add_argument("--default-ratio", type=float, help="ratio the handler serves unless model-config says otherwise")
    p.add_argument("--config", type=Path, help="model-config.yaml to start from (default: config/model-config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override model-config.yaml, e.g. --set batchSize=8 --set hetserve.micro_batch=2")
    p.add_argument("--version", default="1.0", dest="model_version")
    p.add_argument("--force", action="store_true", help="overwrite an existing .mar")
    p.set_defaults(run=cmd_archive)

    p = sub.add_parser("partition", help="cut a model and report cut quality per ratio and method")
    _add_model_args(p)
    p.add_argument("--method", default="metis", help="comma-separated: metis,exact,prefix")
    p.add_argument("--report", type=Path, required=True, help="JSON report path")
    p.add_argument("--out-dir", type=Path, help="keep the stages here (default: a temporary folder)")
    p.set_defaults(run=cmd_partition)

    p = sub.add_parser("topology", help="show the physical cores and core groups the runtime would use")
    p.add_argument("--policy", default="numa", help="numa | socket | size:K")
    p.add_argument("--sys-root", default="/sys")
    p.set_defaults(run=cmd_topology)

    from hetserve import bench

    p = sub.add_parser("bench", help="drive a running TorchServe: open/closed loop, rate sweep, JSON + PNG")
    bench.add_arguments(p)
    p.set_defaults(run=bench.main)

    p = sub.add_parser("advise", help="batchSize/maxBatchDelay that minimise latency at a rate (performance history)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--mar", type=Path, help="the served .mar: its history is read from --state-dir")
    source.add_argument("--history", type=Path, help="a performance history JSON (the runtime's state file)")
    source.add_argument("--check", type=Path, help="serving_cpu.json: predicted vs measured for each hetserve row")
    p.add_argument("--state-dir", type=Path, help="default: $HETSERVE_STATE_DIR or ~/.cache/hetserve")
    p.add_argument("--store", type=Path, help="with --check: the model store the measured .mar files came from "
                   "(picks each model's exact history; default: its newest)")
    p.add_argument("--rate", type=float, action="append", help="requests/s to advise for; repeatable")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="the serving config the history was measured under, e.g. --set hetserve.core_groups=size:1")
    p.add_argument("--p99-ms", type=float, default=500.0)
    p.add_argument("--objective", choices=("mean", "p99"), default="mean")
    p.add_argument("--arrival", choices=("poisson", "constant"), default="poisson")
    p.add_argument("--overhead-ms", type=float, default=0.0, help="per-batch cost outside the model")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="candidates, e.g. 1,2,4,8,16,32")
    p.add_argument("--delays-ms", type=_ints, default=None, help="candidates, e.g. 0,2,5,10,20,50")
    p.add_argument("--out", type=Path, help="write the advice (or the check) as JSON here")
    p.set_defaults(run=cmd_advise)

    p = sub.add_parser("tune", help="Bayesian search (optuna) over serving knobs on live TorchServes")
    p.add_argument("--mar", type=Path, required=True, help="the archive to tune (variants never re-cut it)")
    p.add_argument("--out", type=Path, required=True, help="folder for the report and the winning config")
    p.add_argument("--compare", action="store_true",
                   help="instead of searching: re-measure the default and the winner of --out side by side")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--objective", choices=("max-rate", "p99"), default="max-rate")
    p.add_argument("--rate", type=float, help="with --objective p99: the fixed offered rate")
    p.add_argument("--p99-ms", type=float, default=500.0)
    p.add_argument("--start-rate", type=float, default=5.0)
    p.add_argument("--factor", type=float, default=1.25)
    p.add_argument("--max-rate", type=float, default=1000.0)
    p.add_argument("--refine", type=int, default=1, help="bisection steps after each trial's sweep")
    p.add_argument("--prune-fraction", type=float, default=0.8,
                   help="a trial starts at this share of the best rate so far and stops if it fails it")
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per rate")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds at the start of each rate")
    p.add_argument("--jvm-warmup", type=float, default=20.0, help="seconds of load after each TorchServe start")
    p.add_argument("--trial-warmup", type=float, default=3.0, help="seconds of load after each registration")
    p.add_argument("--fix", action="append", default=[], metavar="KNOB=VALUE", help="pin a knob, e.g. --fix workers=1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-tune")
    p.set_defaults(run=cmd_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Every user error in the pipeline is a ValueError subclass with a message meant for people.
        print(f"hetserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace):
    """Load, export and cost the model: the shared first half of archive and partition."""
    from partitioner.export import export_onnx
    from partitioner.loading import load_model
    from partitioner.profile import flops_costs, profile_nodes

    started = time.perf_counter()
    loaded = load_model(args.model, weights=args.weights, input_shape=args.input_shape)
    model = export_onnx(loaded, opset=args.opset)
    log.info("exported %d nodes in %.1f s", len(model.graph.node), time.perf_counter() - started)
    if args.cost == "flops":
        costs = flops_costs(model)
        record: dict[str, Any] = {"source": "flops", "unit": "flop/sample", "costs": costs}
    else:
        profile = profile_nodes(
            model, device=args.profile_device, batch=args.profile_batch,
            runs=args.profile_runs, progress=not args.quiet,
        )
        costs = profile.costs
        record = {"source": "profile", **profile.to_json()}
    return model, costs, record


def _producer() -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    from hetserve import __version__

    return {"hetserve": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        value = yaml.safe_load(raw)
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def cmd_archive(args: argparse.Namespace) -> int:
    from partitioner.archive import copy_runtime, model_config, package
    from partitioner.build import DEFAULT_RATIOS, CutOptions, build_stage_directory

    started = time.perf_counter()
    options = CutOptions(
        ratios=args.ratios or DEFAULT_RATIOS, methods=(args.method,), tolerance=args.tolerance,
        time_limit=args.time_limit, seed=args.seed,
    )
    config = model_config(args.config, _overrides(args.set))
    model, costs, record = _prepare(args)
    with tempfile.TemporaryDirectory(prefix="hetserve-stage-") as tmp:
        stage_dir = Path(tmp) / args.model_name
        copy_runtime(stage_dir)
        result = build_stage_directory(
            model, costs, stage_dir, args.model_name, options, profile_record=record,
            default_ratio=args.default_ratio, progress=not args.quiet, producer=_producer(),
        )
        mar = package(stage_dir, args.model_name, args.export_path, config, version=args.model_version, force=args.force)
    _print_rows(result.rows)
    print(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from partitioner.build import DEFAULT_RATIOS, CutOptions, build_stage_directory, rows_to_json

    methods = tuple(m.strip() for m in args.method.split(",") if m.strip())
    options = CutOptions(
        ratios=args.ratios or DEFAULT_RATIOS, methods=methods, tolerance=args.tolerance,
        time_limit=args.time_limit, seed=args.seed,
    )
    model, costs, record = _prepare(args)
    with tempfile.TemporaryDirectory(prefix="hetserve-partition-") as tmp:
        out_dir = args.out_dir or Path(tmp) / "stages"
        result = build_stage_directory(
            model, costs, out_dir, Path(args.model).stem, options, profile_record=record,
            progress=not args.quiet, producer=_producer(),
        )
    report = {
        "model": args.model,
        "cost": record.get("source"),
        "nodes": len(model.graph.node),
        "rows": rows_to_json(result.rows),
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    _print_rows(result.rows)
    print(f"wrote {args.report}")
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from handlers.hardware.topology import plan_groups, probe

    topo = probe(sys_root=args.sys_root)
    print(topo.describe())
    for group in plan_groups(topo, args.policy):
        print(f"group {group.name}: cpus {list(group.cpus)} (socket {group.socket}, numa {group.numa})")
    return 0


def _print_rows(rows) -> None:
    print(f"{'method':<7} {'ratio':>5} {'achieved':>8} {'cut KB':>9} {'valid':>5} {'max|err|':>9} {'s':>6}")
    for r in rows:
        print(
            f"{r.method:<7} {r.ratio:>5.2f} {r.achieved_ratio:>8.3f} {r.cut_bytes / 1024:>9.1f} "
            f"{'yes' if r.valid else 'NO':>5} {r.max_abs_err:>9.2e} {r.seconds:>6.2f}"
            + (f"  ({r.note})" if r.note else "")
        )


def cmd_advise(args: argparse.Namespace) -> int:
    from hetserve import advisor

    if args.check:
        report = advisor.check_file(args.check, state_dir=args.state_dir, store=args.store)
        for model, entry in report["models"].items():
            print(f"{model}: fitted per-batch overhead {entry['fitted_overhead_ms']:.1f} ms ({entry['history']})")
            for name, row in entry["rows"].items():
                err = row["median_abs_mean_error_below_knee"]
                knee_err = row["knee_error"]
                bound = ">=" if row["measured_knee_is_lower_bound"] else ""
                print(f"  {name:<28} knee predicted {row['predicted_knee_rps']:6.1f} measured "
                      f"{bound}{row['measured_knee_rps'] or 0:.1f} req/s ({'n/a' if knee_err is None else f'{knee_err:+.0%}'}); "
                      f"median |mean latency error| below the knee {'n/a' if err is None else f'{err:.0%}'}")
    else:
        if not args.rate:
            raise ValueError("give --rate (requests/s to advise for), or --check")
        overrides = _overrides(args.set)
        report = advisor.advise_from_files(
            mar=args.mar, history_path=args.history, state_dir=args.state_dir, config=overrides,
            rates=args.rate, p99_ms=args.p99_ms, objective=args.objective, arrival=args.arrival,
            overhead_ms=args.overhead_ms, batch_sizes=args.batch_sizes, delays_ms=args.delays_ms)
        print(f"history {report['history']}; layout {report['layout']}")
        for advice in report["advice"]:
            best = advice["best"]
            if best is None:
                print(f"  {advice['rate']:g} req/s: no batch size sustains it on this layout")
                continue
            print(f"  {advice['rate']:g} req/s: batchSize={best['batch_size']} maxBatchDelay={best['max_delay_ms']:g} "
                  f"-> mean {best['mean_ms']:.1f} ms, p99 {best['p99_ms']:.1f} ms (paper's T*(N-1)+S: {best['paper_ms']:.1f} ms)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from hetserve.knee import Criteria
    from hetserve.tuner import TuneOptions, compare, tune_archive

    options = TuneOptions(
        trials=args.trials, objective=args.objective, rate=args.rate, criteria=Criteria(p99_ms=args.p99_ms),
        start_rate=args.start_rate, factor=args.factor, max_rate=args.max_rate, refine=args.refine,
        prune_fraction=args.prune_fraction, seed=args.seed)
    harness = {"duration": args.duration, "warmup": args.warmup, "jvm_warmup": args.jvm_warmup,
               "trial_warmup": args.trial_warmup}
    if args.compare:
        compare(args.mar, args.out / "tune_report.json", args.out, args.work / "compare", options, harness)
        return 0
    fixed = {k: v for pair in args.fix for k, v in _overrides([pair]).items()}
    report = tune_archive(args.mar, args.out, options, args.work, harness, fixed=fixed)
    best, default = report["best"], report["default"]
    if best:
        print(f"best trial {best['number']}: {best['value']:.1f}; shipped default: "
              f"{default['value'] if default else float('nan'):.1f}; gain {report['gain_over_default'] or float('nan'):.2f}x")
    print(f"wrote {args.out}/tune_report.json, tune_report.md, model-config.yaml, config.properties")
    return 0
