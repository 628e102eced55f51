"""Max sustained request rate on this machine's CPUs, every configuration side by side in one run.

Rows (issue 3): (a) stock TorchServe BaseHandler + eager PyTorch, TorchServe defaults; (a') stock
TorchServe BaseHandler + its own ONNX Runtime path on the same .onnx hetserve serves (the handler a
TorchServe user would write for an ONNX model: benchmarks/baseline/stock_onnx_handler.py); (b) hetserve,
whole model, one core group; (b') whole model, one group per core; (c) the two-stage pipeline over
two core groups; (d) in-process ONNX Runtime without a server, the ceiling. Each server row is a
fresh TorchServe on 127.0.0.1 driven over REST by the open-loop generator (Poisson arrivals, the
paper's setting); "max sustained" is the highest offered rate with p99 <= the target, >= 95% of
it served and <= 1% errors. Bodies are raw float32 tensors (1x3x224x224).

    python benchmarks/serving_cpu.py                       # resnet18 and googlenet, full sweep
    python benchmarks/serving_cpu.py --models resnet18 --quick
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from hetserve.benchmarking.harness import (
    CPU_ROWS,
    Load,
    SweepSettings,
    add_sweep_arguments,
    fill,
    hetserve_archive,
    physical_cores,
    report_header,
    stock_archive,
    stock_eager_archive,
    sweep_server,
    whole_model_files,
)
from hetserve.benchmarking.harness import (
    in_process_ceiling as harness_ceiling,
)
from hetserve.knee import Criteria, plot_curves
from hetserve.loadgen import LoadResult
from partitioner.archive import with_config

BENCHMARKS = Path(__file__).resolve().parent
BASELINE = BENCHMARKS / "baseline"
SHAPE = (1, 3, 224, 224)
def build_hetserve_mar(model: str, store: Path, ratios: str = "0.5,0.8", *extra: str) -> Path:
    """``hetserve archive`` of a zoo model into ``store`` (kept: later runs reuse it); ``extra``
    are further archive options, e.g. the profiling device."""
    # Rows name the ratio they serve; a ratio the model's graph cannot reach within the tolerance
    # is kept as its nearest cut (labelled by what it reaches) rather than failing the run.
    return hetserve_archive(store, model, f"zoo:{model}", "--ratios", ratios, "--allow-off-target", *extra)


def build_stock_onnx_mar(model: str, store: Path, hetserve_mar: Path) -> Path:
    """Row (a'): the whole-model .onnx out of hetserve's archive (with its external weights), served
    by the stock BaseHandler's ONNX Runtime path; TorchServe's defaults (no model-config.yaml)."""
    name = f"stock_onnx_{model.replace('-', '_')}"
    if (store / f"{name}.mar").exists():
        return store / f"{name}.mar"
    with tempfile.TemporaryDirectory() as tmp:
        whole, extra = whole_model_files(hetserve_mar, Path(tmp))
        return stock_archive(store, name, BASELINE / "stock_onnx_handler.py",
                             serialized_file=whole, extra_files=extra)


def in_process_ceiling(store: Path, model: str, seconds: float) -> dict:
    """ONNX Runtime with no server, batch 8: the best of one session over every physical core
    (unpinned and pinned) and one single-thread session per core side by side
    (``hetserve.benchmarking.harness.in_process_ceiling``)."""
    batch = 8
    with tempfile.TemporaryDirectory() as tmp:
        whole, _ = whole_model_files(store / f"{model}.mar", Path(tmp))
        ceiling = harness_ceiling(whole, batch, seconds)
    return {"samples_per_s": {k: v["samples_per_s"] for k, v in ceiling["layouts"].items()},
            "best": ceiling["samples_per_s"], "layout": ceiling["layout"], "batch": batch}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,googlenet")
    p.add_argument("--rows", default="a,a2,b,b2,b3,c,d", help="subset of a,a2,b,b2,b3,c,d (a2 is row a')")
    add_sweep_arguments(p)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-bench")
    p.add_argument("--out", type=Path, default=BENCHMARKS / "results")
    args = p.parse_args()
    settings = SweepSettings.from_args(args)
    rows = set(args.rows.split(","))
    criteria = Criteria(p99_ms=args.p99_ms)
    cores = physical_cores()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.work / "store"
    store.mkdir(exist_ok=True)
    body = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32).tobytes()
    load = Load.tensor(body, SHAPE)
    report = {**report_header(criteria), "body": f"raw float32 {SHAPE}",
              "settings": {k: getattr(settings, k) for k in ("duration", "warmup", "jvm_warmup", "start_rate", "factor", "refine")},
              "models": {}}
    for model in args.models.split(","):
        print(f"== {model}", flush=True)
        entry: dict = {"rows": {}}
        hetserve_mar = build_hetserve_mar(model, store)
        curves: dict[str, list[LoadResult]] = {}
        if "a" in rows:
            print("  a_stock_eager", flush=True)
            stock = stock_eager_archive(store, model, BASELINE / "stock_handler.py")
            sweep = sweep_server(store, stock.name, args.work / "ts-a", load, settings, criteria,
                                 base_config=BASELINE / "default.properties")
            entry["rows"]["a_stock_eager"] = json.loads(sweep.to_json())
            curves["a stock BaseHandler (eager)"] = sweep.by_rate()
        if "a2" in rows:
            print("  a2_stock_onnx", flush=True)
            sweep = sweep_server(store, build_stock_onnx_mar(model, store, hetserve_mar).name, args.work / "ts-a2",
                                 load, settings, criteria, base_config=BASELINE / "default.properties")
            entry["rows"]["a2_stock_onnx"] = json.loads(sweep.to_json())
            curves["a' stock BaseHandler (ONNX Runtime)"] = sweep.by_rate()
        for key, config in CPU_ROWS.items():
            if key.split("_")[0] not in rows:
                continue
            print(f"  {key}", flush=True)
            variant = with_config(hetserve_mar, store / f"{model}-{key}.mar", fill(config, cores))
            sweep = sweep_server(store, variant.name, args.work / f"ts-{key}", load, settings, criteria)
            entry["rows"][key] = {**json.loads(sweep.to_json()), "config": fill(config, cores)}
            curves[key.replace("_", " ", 1)] = sweep.by_rate()
        if "d" in rows:
            print("  d_in_process_ort", flush=True)
            entry["rows"]["d_in_process_ort"] = in_process_ceiling(store, model, settings.duration)
        entry["summary"] = summarize(entry["rows"])
        report["models"][model] = entry
        if curves:
            plot_curves(curves, args.out / f"serving_cpu_{model}.png", log_y=True, criteria=criteria,
                        title=f"{model}: latency vs offered rate ({cores} cores, p99 target {args.p99_ms:g} ms)")
        print(json.dumps(entry["summary"], indent=1), flush=True)
    name = "serving_cpu_quick.json" if args.quick else "serving_cpu.json"
    (args.out / name).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out / name}")
    return 0


def summarize(rows: dict) -> dict:
    """Max sustained rate per row, and each row as a ratio of (a), of (a') and of (d)."""
    rates = {k: v["knee_rate"] or 0.0 for k, v in rows.items() if "knee_rate" in v}
    out = {"max_sustained_rps": rates}
    if "d_in_process_ort" in rows:
        out["ceiling_samples_per_s"] = rows["d_in_process_ort"]["best"]
        out["vs_ceiling"] = {k: round(r / out["ceiling_samples_per_s"], 3) for k, r in rates.items()}
    if rates.get("a_stock_eager"):
        out["vs_stock"] = {k: round(r / rates["a_stock_eager"], 2) for k, r in rates.items()}
    if rates.get("a2_stock_onnx"):
        # The fair baseline: the same .onnx on stock TorchServe, as a TorchServe user would serve it.
        out["vs_stock_onnx"] = {k: round(r / rates["a2_stock_onnx"], 2) for k, r in rates.items()}
    best = max((k for k in rates if not k.startswith(("a_", "a2_"))), key=rates.get, default=None)
    out["best_hetserve_row"] = best
    return out


if __name__ == "__main__":
    raise SystemExit(main())
