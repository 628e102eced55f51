"""hetserve command line: one entry point, one subcommand per job.

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


def _input_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    name, sep, shape = text.rpartition("=")
    return (name if sep else None), _shape(shape)


def _named(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _paths(text: str) -> tuple[Path, ...]:
    return tuple(Path(x.strip()) for x in text.split(",") if x.strip())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="zoo:NAME[?k=v&...], path/to/file.py:factory, or model.onnx")
    p.add_argument("--weights", help="weights for the model, .safetensors only (never pickle)")
    p.add_argument("--input-shape", type=_input_shape, action="append", help="sample shape without batch, e.g. 3,224,224 (factory returning a bare module); NAME=SHAPE per named input, repeatable, e.g. input_ids=128")
    p.add_argument("--input-dtype", type=_named, action="append", default=[], metavar="NAME=DTYPE", help="dtype of a named input of a bare module (default float32), e.g. input_ids=int64; repeatable")
    p.add_argument("--dynamic", action="append", default=[], metavar="INPUT:AXIS=SYMBOL", help="a dynamic dim beyond the batch, e.g. input_ids:1=seq; inputs sharing a symbol must agree at run time; repeatable (an .onnx declares its own through symbolic dims)")
    p.add_argument("--dim", action="append", default=[], metavar="SYMBOL=SIZE|SYMBOL<=MAX|SYMBOL>=MIN", help="a dynamic dim's representative size for profiling, pricing the cut and verification (e.g. seq=128; default: the example's size) or its bounds served (e.g. seq<=512); repeatable")
    p.add_argument("--allow-off-target", action="store_true", help="keep the nearest cut when a ratio is unreachable within --tolerance (labelled with the ratio it achieves) instead of failing")
    p.add_argument("--ratios", type=_ratios, default=None, help="head shares of the cost, e.g. 0.75,0.8,0.85,0.9")
    p.add_argument("--tolerance", type=float, default=0.03, help="accepted distance from each ratio")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds for the exact solver per cut")
    p.add_argument("--cost", choices=("profile", "flops"), default="profile", help="node cost source")
    p.add_argument("--profile-device", choices=("cpu", "cuda"), default="cpu", help="device the per-node profile runs on")
    p.add_argument("--profile-batch", type=int, default=1, help="batch size of the profiling runs")
    p.add_argument("--profile-runs", type=int, default=10, help="timed runs per pass; 3 passes, each node costs the median of the passes' medians")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset of the export")
    p.add_argument("--seed", type=int, default=0, help="seed of the partitioner (METIS) and the verification inputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--task", choices=("image-classification", "text-classification"),
                   help="with --model hf:DIR: the transformers Auto class to build the directory's model with")
    p.add_argument("--max-length", type=int,
                   help="text models: the longest tokenized input served (and the exported sequence length)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and shows each flag's default (unless unset or in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or default is argparse.SUPPRESS
                or default is None or default is False or default in ([], ())):
            return text
        return f"{text} (default: %(default)s)"


def _command(sub, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=f"{summary}.\n\n{description}",
                          epilog=f"examples:\n{examples}", formatter_class=HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    from hetserve import __version__

    parser = argparse.ArgumentParser(
        prog="hetserve", formatter_class=HelpFormatter,
        description="Serve one neural network across a GPU and the CPU cores of the same box, on TorchServe.",
        epilog="run 'hetserve COMMAND -h' for a command's flags and examples")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"hetserve {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")

    p = _command(sub, "archive", "export, profile, cut and pack a model into a .mar",
                 "Exports the model to ONNX, costs every node (profile or FLOPs), cuts it into a head\n"
                 "and a tail at each ratio, verifies each pair against the whole model and packs\n"
                 "them with the handler into a TorchServe archive. Inputs are checked first.",
                 "  hetserve archive --model zoo:resnet18 --model-name resnet18 --export-path model_store\n"
                 "  hetserve archive --model my_model.py:build --input-shape 3,224,224 --model-name mine \\\n"
                 "      --ratios 0.8 --set batchSize=8 --set hetserve.micro_batch=2 -f")
    _add_model_args(p)
    p.add_argument("--method", choices=("metis", "exact", "prefix"), default="metis", help="cut algorithm")
    p.add_argument("--model-name", required=True, help="TorchServe model name (letters, digits, '_', '-', '.')")
    p.add_argument("--export-path", type=Path, default=Path("model_store"), help="folder the .mar is written to")
    p.add_argument("--default-ratio", type=float, help="ratio the handler serves unless model-config says otherwise")
    p.add_argument("--config-file", "--config", type=Path, dest="config",
                   help="model-config.yaml to start from (default: the shipped config/model-config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override model-config.yaml, e.g. --set batchSize=8 --set hetserve.micro_batch=2")
    p.add_argument("--version", default="1.0", dest="model_version", help="model version recorded in the archive")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing .mar")
    p.add_argument("--extra-files", type=_paths, default=(), metavar="PATH[,PATH...]",
                   help="files or folders to add to the archive's root (hashed in its manifest)")
    p.add_argument("--requirements-file", type=Path,
                   help="requirements.txt TorchServe installs when install_py_dep_per_model=true")
    p.add_argument("--labels", type=Path, help="class names to pack (labels.json list or {index: name}, or .txt one per line); "
                   "answers {name: score} JSON")
    p.add_argument("--tokenizer", type=Path, help="a tokenizer.json to pack: the archive then takes text")
    p.add_argument("--image-processor", metavar="imagenet|FILE.json",
                   help="take JPEG/PNG/WebP: 'imagenet' (resize 256, crop 224, ImageNet mean/std) or a "
                   "Hugging Face preprocessor_config.json")
    p.add_argument("--top-k", type=int, help="how many labels an answer names (default 5)")
    q = p.add_argument_group("int8 (CPU executors)")
    q.add_argument("--quantize", choices=("int8",),
                   help="also pack int8 stages for CPU executors (served with --set hetserve.precision=int8); "
                   "GPU executors keep the float stages")
    q.add_argument("--calibration", type=Path, metavar="DIR",
                   help="real inputs to calibrate int8 on and check it against float32: images (through the "
                   "archive's image processor), .txt (one text per line, through its tokenizer), .npy/.npz")
    q.add_argument("--quantize-method", choices=("auto", "static", "dynamic", "dynamic_u8"), default="auto",
                   help="static QDQ (calibrated activations), dynamic (MatMul/Gemm weights int8, or uint8: "
                   "dynamic_u8), or auto: each measured, the fastest that meets --min-accuracy kept")
    q.add_argument("--min-accuracy", type=float, default=0.99,
                   help="int8 vs float32 on held-out calibration inputs: top-1 agreement for classifiers, "
                   "mean cosine similarity otherwise; below it the archive is refused")
    q.add_argument("--allow-accuracy-loss", action="store_true",
                   help="archive int8 stages that miss --min-accuracy (the miss is recorded in the manifest)")
    p.set_defaults(run=cmd_archive)

    p = _command(sub, "partition", "cut a model and report cut quality per ratio and method",
                 "Runs the archive's export, costing and cutting without packing: one report row per\n"
                 "ratio and method (achieved ratio, cut size, validity, numerical error).",
                 "  hetserve partition --model zoo:resnet18 --ratios 0.75,0.8,0.9 --method metis,exact \\\n"
                 "      --report cuts.json")
    _add_model_args(p)
    p.add_argument("--method", default="metis", help="comma-separated: metis,exact,prefix")
    p.add_argument("--report", type=Path, required=True, help="JSON report path")
    p.add_argument("--out-dir", type=Path, help="keep the stages here (default: a temporary folder)")
    p.set_defaults(run=cmd_partition)

    p = _command(sub, "topology", "show the physical cores and core groups the runtime would use",
                 "Reads /sys (sockets, NUMA nodes, SMT siblings) and prints the CPU groups the\n"
                 "handler's executors would be pinned to under a hetserve.core_groups policy.",
                 "  hetserve topology\n  hetserve topology --policy size:2")
    p.add_argument("--policy", default="numa", help="numa | socket | size:K")
    p.add_argument("--sys-root", default="/sys", help="sysfs root to read (another path for tests)")
    p.set_defaults(run=cmd_topology)

    from hetserve import bench

    p = _command(sub, "bench", "drive a running TorchServe: open/closed loop, rate sweep, JSON + PNG",
                 "Measures one server configuration (--label) at one rate, over a rate sweep up to\n"
                 "the knee, or closed-loop. Exits 1 when no measured rate meets the criteria.",
                 "  hetserve bench --url http://127.0.0.1:8080/predictions/resnet18 --shape 1,3,224,224 \\\n"
                 "      --key-file key_file.json --sweep --p99-ms 500 --label default --out bench.json")
    bench.add_arguments(p)
    p.set_defaults(run=bench.main)

    p = _command(sub, "advise", "batchSize/maxBatchDelay that minimise latency at a rate (performance history)",
                 "Reads the performance history the handler keeps for an archive and predicts, for\n"
                 "each rate, the batching that minimises mean or p99 latency; --check compares the\n"
                 "predictions with a measured serving_cpu.json.",
                 "  hetserve advise --mar model_store/resnet18.mar --rate 20 --rate 40\n"
                 "  hetserve advise --check benchmarks/results/serving_cpu.json")
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
    p.add_argument("--p99-ms", type=float, default=500.0, help="p99 latency a candidate must keep")
    p.add_argument("--objective", choices=("mean", "p99"), default="mean", help="latency to minimise")
    p.add_argument("--arrival", choices=("poisson", "constant"), default="poisson", help="arrival process of the requests")
    p.add_argument("--overhead-ms", type=float, default=0.0, help="per-batch cost outside the model")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="candidates, e.g. 1,2,4,8,16,32")
    p.add_argument("--delays-ms", type=_ints, default=None, help="candidates, e.g. 0,2,5,10,20,50")
    p.add_argument("--out", type=Path, help="write the advice (or the check) as JSON here")
    p.set_defaults(run=cmd_advise)

    p = _command(sub, "tune", "Bayesian search (optuna) over serving knobs on live TorchServes",
                 "Serves archive variants (no re-cut) on local TorchServes and searches workers,\n"
                 "batching, core groups and micro-batching for the highest sustained rate (or the\n"
                 "lowest p99 at --rate); writes the report and the winning config files.",
                 "  hetserve tune --mar model_store/resnet18.mar --out tune_resnet18 --trials 12\n"
                 "  hetserve tune --mar model_store/resnet18.mar --out tune_resnet18 --compare")
    p.add_argument("--mar", type=Path, required=True, help="the archive to tune (variants never re-cut it)")
    p.add_argument("--out", type=Path, required=True, help="folder for the report and the winning config")
    p.add_argument("--compare", action="store_true",
                   help="instead of searching: re-measure the default and the winner of --out side by side")
    p.add_argument("--trials", type=int, default=12, help="configurations to try")
    p.add_argument("--objective", choices=("max-rate", "p99", "goodput"), default="max-rate",
                   help="highest rate under --p99-ms, lowest p99 at --rate, or answers/s of a closed "
                        "loop of --concurrency clients x min(1, --p99-ms / p99); 0 if > 1%% fail)")
    p.add_argument("--search", choices=("tpe", "local"), default="tpe",
                   help="tpe (optuna), or local: one knob of the best at a time from the shipped "
                        "default (benchmarks/tuner_vs_grid.py; suits budgets of a few trials)")
    p.add_argument("--concurrency", type=int, default=8, help="clients of the goodput objective")
    p.add_argument("--rate", type=float, help="with --objective p99: the fixed offered rate")
    p.add_argument("--p99-ms", type=float, default=500.0, help="p99 latency a rate must keep to count")
    p.add_argument("--start-rate", type=float, default=5.0, help="first rate of each sweep, requests/s")
    p.add_argument("--factor", type=float, default=1.25, help="rate multiplier between sweep steps")
    p.add_argument("--max-rate", type=float, default=1000.0, help="highest rate a sweep tries")
    p.add_argument("--refine", type=int, default=1, help="bisection steps after each trial's sweep")
    p.add_argument("--prune-fraction", type=float, default=0.8,
                   help="a trial starts at this share of the best rate so far and stops if it fails it")
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per rate")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds at the start of each rate")
    p.add_argument("--jvm-warmup", type=float, default=20.0, help="seconds of load after each TorchServe start")
    p.add_argument("--trial-warmup", type=float, default=3.0, help="seconds of load after each registration")
    p.add_argument("--fix", action="append", default=[], metavar="KNOB=VALUE", help="pin a knob, e.g. --fix workers=1")
    p.add_argument("--seed", type=int, default=0, help="seed of the search")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-tune",
                   help="scratch folder for variants and server logs")
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
    from partitioner.export import export_onnx, resolve_dynamic, torch_reference
    from partitioner.loading import load_model
    from partitioner.profile import flops_costs, profile_nodes

    started = time.perf_counter()
    loaded = load_model(
        args.model, weights=args.weights, input_shape=_shape_arg(args.input_shape),
        input_dtypes=dict(args.input_dtype) or None, task=args.task, max_length=args.max_length,
    )
    declared = _dynamic_arg(args)
    model = export_onnx(loaded, opset=args.opset, dynamic=declared)
    dynamic = resolve_dynamic(model, loaded, declared)
    log.info("exported %d nodes in %.1f s", len(model.graph.node), time.perf_counter() - started)
    if args.cost == "flops":
        costs = flops_costs(model, dict(dynamic.sizes))
        record: dict[str, Any] = {"source": "flops", "unit": "flop/sample", "costs": costs}
    else:
        profile = profile_nodes(
            model, device=args.profile_device, batch=args.profile_batch,
            runs=args.profile_runs, progress=not args.quiet, dim_sizes=dict(dynamic.sizes),
        )
        costs = profile.costs
        record = {"source": "profile", **profile.to_json()}
    outputs = [o.name for o in model.graph.output]
    reference = torch_reference(loaded, outputs) if loaded.module is not None else None
    return model, costs, record, dynamic, reference, loaded


def _shape_arg(given):
    if not given:
        return None
    named = [(n, s) for n, s in given if n is not None]
    if not named:
        if len(given) > 1:
            raise ValueError("--input-shape without a name can be given once; use NAME=SHAPE")
        return given[0][1]
    if len(named) != len(given):
        raise ValueError("--input-shape: name every input (NAME=SHAPE) or give one bare shape")
    return dict(named)


def _dynamic_arg(args: argparse.Namespace):
    from handlers.protocol.dynamic_dims import parse_declarations

    return parse_declarations(args.dynamic, args.dim)


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
        if not sep or not key or "" in key.split("."):
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"--set {key}: {raw!r} is not a YAML value") from None
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def cmd_archive(args: argparse.Namespace) -> int:
    from hetserve import archive_checks as checks
    from partitioner.archive import copy_runtime, model_config, package
    from partitioner.build import DEFAULT_RATIOS, CutOptions, build_stage_directory, check_loads

    started = time.perf_counter()
    # Everything checkable is checked before the export: a typo must not cost a minute of work.
    checks.check_model_name(args.model_name)
    checks.check_target(args.export_path, args.model_name, args.force)
    checks.check_extra_files(args.extra_files)
    checks.check_requirements_file(args.requirements_file)
    config = model_config(args.config, _overrides(args.set))
    checks.check_model_config(config)
    ratios = args.ratios or DEFAULT_RATIOS
    checks.check_ratios(ratios, args.default_ratio, (config.get("hetserve") or {}).get("ratio"))
    checks.check_quantize(args.quantize, args.calibration, args.min_accuracy,
                          (config.get("hetserve") or {}).get("precision"))
    options = CutOptions(
        ratios=ratios, methods=(args.method,), tolerance=args.tolerance,
        time_limit=args.time_limit, seed=args.seed, allow_off_target=args.allow_off_target,
    )
    from partitioner import processor_files

    overrides = _overrides(args.set)
    model, costs, record, dynamic, reference, loaded = _prepare(args)
    processors, files = processor_files.declared(
        loaded.processors, loaded.files, labels=args.labels, tokenizer=args.tokenizer,
        image_processor=args.image_processor, top_k=args.top_k,
    )
    if processors:  # the model's and the flags' processors, under any --set of the user's
        user = overrides.get("hetserve", {}).get("processors", {})
        merged = {k: {**processors.get(k, {}), **(user.get(k) or {})} for k in {*processors, *user}}
        overrides = {**overrides, "hetserve": {**overrides.get("hetserve", {}), "processors": merged}}
        config = model_config(args.config, overrides)
        checks.check_model_config(config)
    with tempfile.TemporaryDirectory(prefix="hetserve-stage-") as tmp:
        stage_dir = Path(tmp) / args.model_name
        copy_runtime(stage_dir)
        _stage_extras(stage_dir, args.extra_files, args.requirements_file)
        processor_files.write(stage_dir, files)  # before the manifest hashes the directory
        result = build_stage_directory(
            model, costs, stage_dir, args.model_name, options, profile_record=record,
            default_ratio=args.default_ratio, progress=not args.quiet, producer=_producer(),
            dynamic=dynamic, reference=reference,
        )
        processor_files.check((config.get("hetserve") or {}).get("processors"), stage_dir, result.manifest)
        manifest, int8_lines = result.manifest, ()
        if args.quantize:  # before the load check: the int8 stages are checked like the others
            quantized = _quantize(args, stage_dir, manifest, config)
            manifest, int8_lines = quantized.manifest, quantized.lines
        check_loads(stage_dir, config, manifest)  # a .mar archive writes always loads
        requirements = stage_dir / args.requirements_file.name if args.requirements_file else None
        mar = package(stage_dir, args.model_name, args.export_path, config, version=args.model_version,
                      force=args.force, requirements_file=requirements)
    _print_rows(result.rows)
    for line in int8_lines:
        print(line)
    print(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
    return 0


def _quantize(args: argparse.Namespace, stage_dir: Path, manifest, config):
    from partitioner.quantize import QuantizeOptions, quantize_stage_directory

    options = QuantizeOptions(
        calibration=args.calibration, min_accuracy=args.min_accuracy,
        allow_accuracy_loss=args.allow_accuracy_loss, method=args.quantize_method, seed=args.seed,
    )
    processors = (config.get("hetserve") or {}).get("processors")
    return quantize_stage_directory(stage_dir, manifest, processors, options,
                                    warn=lambda line: print(line, file=sys.stderr))


def _stage_extras(stage_dir: Path, extras, requirements: Path | None) -> None:
    """Copy --extra-files and the requirements file into the stage folder, before it is hashed."""
    import shutil

    for path in [*extras, *([requirements] if requirements else [])]:
        if path.is_dir():
            shutil.copytree(path, stage_dir / path.name)
        else:
            shutil.copy2(path, stage_dir / path.name)


def cmd_partition(args: argparse.Namespace) -> int:
    from partitioner.build import DEFAULT_RATIOS, CutOptions, build_stage_directory, rows_to_json

    methods = tuple(m.strip() for m in args.method.split(",") if m.strip())
    options = CutOptions(
        ratios=args.ratios or DEFAULT_RATIOS, methods=methods, tolerance=args.tolerance,
        time_limit=args.time_limit, seed=args.seed, allow_off_target=args.allow_off_target,
    )
    model, costs, record, dynamic, reference, _ = _prepare(args)
    with tempfile.TemporaryDirectory(prefix="hetserve-partition-") as tmp:
        out_dir = args.out_dir or Path(tmp) / "stages"
        result = build_stage_directory(
            model, costs, out_dir, Path(args.model).stem, options, profile_record=record,
            progress=not args.quiet, producer=_producer(), dynamic=dynamic, reference=reference,
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


def tune_options(args: argparse.Namespace):  # -> hetserve.tuner.TuneOptions (optuna imported late)
    from hetserve.knee import Criteria
    from hetserve.tuner import TuneOptions

    return TuneOptions(
        trials=args.trials, objective=args.objective, rate=args.rate, criteria=Criteria(p99_ms=args.p99_ms),
        start_rate=args.start_rate, factor=args.factor, max_rate=args.max_rate, refine=args.refine,
        prune_fraction=args.prune_fraction, seed=args.seed, search=args.search,
        concurrency=args.concurrency)


def cmd_tune(args: argparse.Namespace) -> int:
    from hetserve.tuner import compare, tune_archive

    options = tune_options(args)
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
