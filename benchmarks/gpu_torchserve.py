"""GPU proof through a real TorchServe (issue 6): stock BaseHandler against hetserve, over REST.

``gpu_serving.py`` drives ``InferenceService.handle`` in process because the GPU machine has no
Java; this one runs the real thing once ``scripts/gpu_bundle_java.sh`` has carried a Java runtime
and TorchServe there. Every row is a fresh TorchServe on 127.0.0.1 (token auth on, the project's
config.properties; the stock row uses TorchServe's defaults), driven by the project's open-loop
generator (Poisson arrivals, raw float32 bodies), one row after the other in one run:

  e_stock_eager     TorchServe's BaseHandler, eager PyTorch, on the GPU TorchServe assigns
  s_stock_ort       TorchServe's BaseHandler serving the same .onnx through its own ONNX
                    Runtime path (CUDA provider, its defaults): the fair stock baseline
  a_whole_1stream   hetserve, whole model, one CUDA stream per worker
  c1_hetero_dmda    hetserve, partitioned at --ratio, each tail placed by EWMA/dmda over the
                    worker's stream and its CPU core groups
  d_tail_cpu        hetserve, partitioned, every tail on the CPU core groups

each with ``--workers`` TorchServe workers (several workers feeding one GPU: each worker gets its
share of the cores through the CPU launcher) and the same batchSize/maxBatchDelay for every row.
Without a GPU the hetserve rows fall back to the CPU ("auto" devices) and the stock row runs on
the CPU: a smoke test of the script, not a GPU figure (the result records which devices ran).

    python3 benchmarks/gpu_torchserve.py --models googlenet --workers 1,4 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_baselines import build_stock_onnx_mar, mar_from_model_dir  # noqa: E402

from handlers.artifact.contract import read_archive  # noqa: E402
from handlers.executors.cuda import cuda_available  # noqa: E402
from hetserve.benchmarking.harness import (  # noqa: E402
    Load,
    SweepSettings,
    hetserve_archive,
    stock_eager_archive,
    sweep_server,
)
from hetserve.knee import Criteria, plot_curves  # noqa: E402
from hetserve.machine import machine_info, run_record  # noqa: E402
from partitioner.archive import with_config  # noqa: E402

BASELINE = REPO / "benchmarks" / "baseline"
HETSERVE_ROWS: dict[str, dict[str, Any]] = {
    "a_whole_1stream": {"ratio": 1.0, "cuda_streams": 1, "micro_batch": 0},
    "c1_hetero_dmda": {"cuda_streams": 1, "micro_batch": 0, "tail_devices": "auto"},
    "d_tail_cpu": {"cuda_streams": 1, "micro_batch": 0, "tail_devices": "cpu"},
}


def served_devices(workdir: Path) -> list[str]:
    """The handler's layout lines from the worker log: which executors really served."""
    lines = []
    for log in sorted((workdir / "logs").glob("model_log*.log")):
        lines += [line.split("]", 1)[-1].strip() for line in log.read_text(errors="replace").splitlines()
                  if " head on " in line or ("CUDA" in line and "hetserve" in line)]
    return lines[:8]


def sweep_row(report: dict, curves: dict, name: str, *sweep_args, **sweep_kwargs) -> None:
    """One row's sweep into the report; a row whose server never came up is recorded as such
    and the others still run."""
    try:
        sweep = sweep_server(*sweep_args, **sweep_kwargs)
    except Exception as exc:  # noqa: BLE001 - one broken row must not lose the run's other rows
        print(f"   {name} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        report["rows"][name] = {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
        return
    report["rows"][name] = json.loads(sweep.to_json())
    curves[name] = sweep.by_rate()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="googlenet")
    p.add_argument("--rows", default="e,a,c1,d", help="subset of e,s,a,c1,d")
    p.add_argument("--knobs", type=json.loads, default={},
                   help='JSON merged into every hetserve row, e.g. {"cuda_graph": true}')
    p.add_argument("--workers", default="1", help="comma list: TorchServe workers per row")
    p.add_argument("--ratio", type=float, default=0.9, help="head share of the cut")
    p.add_argument("--groups", default="size:4", help="CPU core-group policy of each worker")
    p.add_argument("--batch", type=int, default=8, help="batchSize (the paper uses 8-27)")
    p.add_argument("--delay-ms", type=int, default=5, help="maxBatchDelay")
    p.add_argument("--p99-ms", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per rate")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds at each rate")
    p.add_argument("--jvm-warmup", type=float, default=8.0, help="seconds of load on each fresh server")
    p.add_argument("--start-rate", type=float, default=100.0)
    p.add_argument("--factor", type=float, default=1.5)
    p.add_argument("--max-rate", type=float, default=4000.0)
    p.add_argument("--refine", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-gpu-ts")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--from-work", type=Path, default=None,
                   help="archive gpu_serving.py's model directory under this work dir (cut at "
                        "--ratio) instead of exporting and profiling again")
    args = p.parse_args()
    rows = set(args.rows.split(","))
    workers = [int(w) for w in args.workers.split(",")]
    criteria = Criteria(p99_ms=args.p99_ms)
    device = "cuda" if cuda_available() else "cpu"
    store = args.work / "store"
    store.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        if args.from_work is not None:
            from gpu_serving import build_model_dir

            model_dir = build_model_dir(model, args.ratio, args.batch, args.from_work, device)
            mar = mar_from_model_dir(model_dir, store, f"{model}-r{args.ratio:g}")
        else:
            mar = hetserve_archive(store, model, f"zoo:{model}", "--ratios", str(args.ratio),
                                   "--profile-device", device, "--profile-batch", str(args.batch))
        shape = (1, *read_archive(mar).manifest.inputs[0].sample_shape)
        body = np.random.default_rng(1).standard_normal(shape).astype(np.float32).tobytes()
        load, settings = Load.tensor(body, shape), SweepSettings.from_args(args)
        report: dict[str, Any] = {
            "benchmark": "gpu_torchserve", **run_record(), "machine": machine_info(),
            "device": device, "criteria": {"p99_ms": args.p99_ms},
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": {},
        }
        curves = {}
        for n in workers:
            serving = {"minWorkers": n, "maxWorkers": n, "batchSize": args.batch,
                       "maxBatchDelay": args.delay_ms, "responseTimeout": 60}
            suffix = f"_{n}w"
            if "e" in rows:
                stock = stock_eager_archive(store, model, BASELINE / "stock_handler.py", serving, suffix)
                name = f"e_stock_eager{suffix}"
                print(f"== {model} {name}", flush=True)
                sweep_row(report, curves, name, store, stock.name, args.work / f"ts-{name}", load,
                          settings, criteria, base_config=BASELINE / "default.properties")
                report["rows"][name]["config"] = serving
            if "s" in rows:
                stock_ort = build_stock_onnx_mar(mar, store, serving, tag=suffix)
                name = f"s_stock_ort{suffix}"
                print(f"== {model} {name}", flush=True)
                sweep_row(report, curves, name, store, stock_ort.name, args.work / f"ts-{model}-{name}",
                          load, settings, criteria, base_config=BASELINE / "default.properties")
                report["rows"][name]["config"] = serving
            for key, knobs in HETSERVE_ROWS.items():
                if key.split("_")[0] not in rows:
                    continue
                name = f"{key}{suffix}"
                config = {**serving, "hetserve": {"core_groups": args.groups, "ratio": args.ratio,
                                                  **knobs, **args.knobs}}
                variant = with_config(mar, store / f"{model}-{name}.mar", config)
                print(f"== {model} {name}", flush=True)
                workdir = args.work / f"ts-{model}-{name}"
                sweep_row(report, curves, name, store, variant.name, workdir, load, settings, criteria)
                report["rows"][name].update(config=config, layout=served_devices(workdir))
        knees = {k: v.get("knee_rate") or 0.0 for k, v in report["rows"].items()}
        best_gpu_only = max((r for k, r in knees.items() if k.startswith("a_")), default=0.0)
        best_stock_ort = max((r for k, r in knees.items() if k.startswith("s_")), default=0.0)
        report["summary"] = {
            "knee_rps": knees,
            "vs_best_whole_model": {k: round(r / best_gpu_only, 3) if best_gpu_only else None
                                    for k, r in knees.items()},
            "vs_best_stock_ort": {k: round(r / best_stock_ort, 3) if best_stock_ort else None
                                  for k, r in knees.items()},
        }
        stem = f"gpu-torchserve-{model}{args.tag}"
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        if curves:
            plot_curves(curves, args.out / f"{stem}.png", log_y=True, criteria=criteria,
                        title=f"{model} on {device} through TorchServe, batchSize {args.batch}")
        print(json.dumps(report["summary"], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
