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
    from handlers.topology import plan_groups, probe

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
