"""Latency vs rate for one hetserve configuration at several batch sizes (StarONNX Figs. 7-8).

Every batch size is served by a fresh TorchServe (JVM warmed up first) and measured at the same
fixed open-loop rates (Poisson), so at each rate the batch size with the lowest latency can be read
off and compared with the advisor's pick (`hetserve advise --check` on the JSON this writes: same
layout as serving_cpu.json, one row per batch size).

    python benchmarks/curves.py --models resnet18 --rates 10,20,40,60,80 --batch-sizes 1,2,4,8
    python benchmarks/curves.py --quick                       # resnet18-tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from handlers.artifact.contract import read_archive  # noqa: E402
from hetserve.benchmarking.harness import fill, hetserve_archive, physical_cores  # noqa: E402
from hetserve.knee import Criteria, find_knee, plot_curves  # noqa: E402
from hetserve.loadgen import Target, idle_latency, run_closed_loop, run_open_loop, wait_until_idle  # noqa: E402
from hetserve.machine import machine_info, run_record  # noqa: E402
from hetserve.tsprocess import start_torchserve  # noqa: E402
from partitioner.archive import with_config  # noqa: E402

# The shipped serving layout (one worker, whole model on one group per core), only batchSize varies.
BASE = {"minWorkers": 1, "maxWorkers": 1, "hetserve": {"ratio": 1.0, "core_groups": "size:1"}}


def measure(store: Path, mar: str, work: Path, shape: tuple, rates: list[float], args) -> list:
    ts = start_torchserve(work, store, {"m": mar})
    try:
        body = np.random.default_rng(1).standard_normal(shape).astype(np.float32).tobytes()
        target = Target.create(f"http://127.0.0.1:{ts.ports['inference']}/predictions/m", body,
                               {"Authorization": f"Bearer {ts.keys['inference']}",
                                "X-Tensor-Shape": ",".join(map(str, shape))})
        run_closed_loop(target, 16, args.jvm_warmup, warmup=0.0)  # JIT first: see serving_cpu.py
        baseline = idle_latency(target)
        points = []
        for rate in rates:
            wait_until_idle(target, baseline)
            r = run_open_loop(target, rate, args.duration, arrival="poisson", warmup=args.warmup, seed=int(rate * 100))
            print(f"    {rate:7.1f} req/s -> {r.throughput_rps:6.1f} served, mean {r.latency_all_ms.mean or 0:7.1f} ms, "
                  f"p99 {r.latency_all_ms.p99 or 0:7.1f} ms, errors {r.errors or 0}", flush=True)
            points.append(r)
            if (r.latency_all_ms.p99 or 0) > 4 * args.p99_ms:  # far past the knee: higher rates add nothing
                break
        return points
    finally:
        ts.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18")
    p.add_argument("--rates", default="10,20,40,60,80")
    p.add_argument("--batch-sizes", default="1,2,4,8")
    p.add_argument("--max-batch-delay", type=int, default=5)
    p.add_argument("--p99-ms", type=float, default=500.0)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--jvm-warmup", type=float, default=25.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-bench")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    if args.quick:
        args.models, args.rates, args.batch_sizes = "resnet18-tiny", "20,80", "1,4"
        args.duration, args.warmup, args.jvm_warmup = 2.0, 0.5, 3.0
    rates = [float(r) for r in args.rates.split(",")]
    criteria = Criteria(p99_ms=args.p99_ms)
    cores = physical_cores()
    store = args.work / "store"
    store.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {**run_record(), "machine": machine_info(), "criteria": asdict(criteria), "models": {}}
    for model in args.models.split(","):
        print(f"== {model}", flush=True)
        mar = hetserve_archive(store, model, f"zoo:{model}", "--ratios", "0.5,0.8")
        shape = (1, *read_archive(mar).manifest.inputs[0].sample_shape)
        rows, curves = {}, {}
        for n in (int(x) for x in args.batch_sizes.split(",")):
            config = fill({**BASE, "batchSize": n, "maxBatchDelay": args.max_batch_delay}, cores)
            name = f"bs{n}"
            print(f"  {name}", flush=True)
            variant = with_config(mar, store / f"{model}-curves-{name}.mar", config)
            points = measure(store, variant.name, args.work / f"ts-curves-{name}", shape, rates, args)
            knee = find_knee(points, criteria)
            rows[name] = {"config": config, "knee_rate": knee.target_rate if knee else None,
                          "points": [json.loads(r.to_json()) for r in points]}
            curves[f"batch {n}"] = points
        report["models"][model] = {"rows": rows}
        stem = "curves_quick" if args.quick else "curves"
        plot_curves(curves, args.out / f"{stem}_{model}.png", log_y=True, criteria=criteria,
                    title=f"{model}: latency vs rate per batch size ({cores} cores)")
    path = args.out / ("curves_quick.json" if args.quick else "curves.json")
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
