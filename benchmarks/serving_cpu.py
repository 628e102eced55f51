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
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hetserve.bench import point_runner  # noqa: E402
from hetserve.knee import Criteria, plot_curves, sweep_rates  # noqa: E402
from hetserve.loadgen import (  # noqa: E402
    LoadResult,
    Target,
    run_closed_loop,
)
from hetserve.machine import machine_info  # noqa: E402
from hetserve.tsprocess import start_torchserve  # noqa: E402
from partitioner.archive import with_config  # noqa: E402

BASELINE = REPO / "benchmarks" / "baseline"
SHAPE = (1, 3, 224, 224)
SERVING = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 10}
HETSERVE_ROWS = {
    "b_whole_one_group": {**SERVING, "hetserve": {"ratio": 1.0, "core_groups": "size:{cores}"}},
    "b2_whole_group_per_core": {**SERVING, "hetserve": {"ratio": 1.0, "core_groups": "size:1"}},
    "b3_whole_worker_per_core": {
        **SERVING, "minWorkers": "{cores}", "maxWorkers": "{cores}", "batchSize": 4,
        "hetserve": {"ratio": 1.0, "core_groups": "size:1"},
    },
    "c_pipeline_two_groups": {
        **SERVING,
        "hetserve": {"ratio": 0.5, "core_groups": "size:1", "cpu_head_groups": 1, "micro_batch": 2},
    },
}


def physical_cores() -> int:
    from handlers.hardware.topology import probe

    return len(probe().cores)


def fill(value, cores: int):
    """Substitute {cores} in a row's config (strings only), keeping numbers numbers."""
    if isinstance(value, dict):
        return {k: fill(v, cores) for k, v in value.items()}
    if isinstance(value, str) and "{cores}" in value:
        text = value.format(cores=cores)
        return int(text) if text.isdigit() else text
    return value


def build_hetserve_mar(model: str, store: Path, ratios: str = "0.5,0.8", *extra: str) -> Path:
    """``hetserve archive`` of a zoo model into ``store`` (kept: later runs reuse it); ``extra``
    are further archive options, e.g. the profiling device."""
    mar = store / f"{model}.mar"
    if not mar.exists():
        subprocess.run(
            [sys.executable, "-m", "hetserve", "archive", "--model", f"zoo:{model}", "--model-name", model,
             "--ratios", ratios, "--export-path", str(store), "--quiet", *extra],
            check=True, cwd=REPO,
        )
    return mar


def build_stock_mar(model: str, store: Path, config: dict | None = None, tag: str = "") -> Path:
    """Eager model file (one class, seeded zoo weights: no pickle) + the stock BaseHandler;
    ``config`` becomes its model-config.yaml (TorchServe's defaults without one)."""
    import yaml
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    name = f"stock_{model.replace('-', '_')}{tag}"
    mar = store / f"{name}.mar"
    if mar.exists():
        return mar
    with tempfile.TemporaryDirectory() as tmp:
        config_file = None
        if config is not None:
            config_file = Path(tmp) / "model-config.yaml"
            config_file.write_text(yaml.safe_dump(config))
        model_file = Path(tmp) / "eager_model.py"
        model_file.write_text(
            "import torch\n\nfrom partitioner.zoo import build\n\n\n"
            "class EagerModel(torch.nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__()\n"
            f"        self.net = build({model!r}).module\n\n"
            "    def forward(self, x):\n"
            "        return self.net(x)\n"
        )
        generate_model_archive(ModelArchiverConfig(
            model_name=name, handler=str(BASELINE / "stock_handler.py"), version="1.0",
            model_file=str(model_file), export_path=str(store), force=True,
            config_file=str(config_file) if config_file else None,
        ))
    return mar


def build_stock_onnx_mar(model: str, store: Path, hetserve_mar: Path) -> Path:
    """Row (a'): the whole-model .onnx out of hetserve's archive (with its external weights), served
    by the stock BaseHandler's ONNX Runtime path; TorchServe's defaults (no model-config.yaml)."""
    import zipfile

    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    from handlers.artifact.archive_safety import external_refs

    name = f"stock_onnx_{model.replace('-', '_')}"
    mar = store / f"{name}.mar"
    if mar.exists():
        return mar
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(hetserve_mar) as z:
        manifest = json.loads(z.read("hetserve-manifest.json"))
        whole = manifest["whole_model"]
        z.extract(whole, tmp)
        # ORT reads external data next to the graph: ship exactly the files the graph points at.
        extra = sorted({dict(ref.entries)["location"] for ref in external_refs(Path(tmp) / whole) if ref.marked_external})
        for name_ in extra:
            z.extract(name_, tmp)
        generate_model_archive(ModelArchiverConfig(
            model_name=name, handler=str(BASELINE / "stock_onnx_handler.py"), version="1.0",
            serialized_file=str(Path(tmp) / whole), export_path=str(store), force=True,
            extra_files=",".join(str(Path(tmp) / n) for n in extra) or None,
        ))
    return mar


def sweep_server(store: Path, mar: str, workdir: Path, body: bytes, args, criteria: Criteria,
                 base_config: Path | None = None, overrides: dict | None = None,
                 shape: tuple[int, ...] = SHAPE):
    kwargs = {"base_config": base_config} if base_config else {}
    ts = start_torchserve(workdir, store, {"m": mar}, overrides=overrides, **kwargs)
    try:
        target = Target.create(
            f"http://127.0.0.1:{ts.ports['inference']}/predictions/m", body,
            {"Authorization": f"Bearer {ts.keys['inference']}", "X-Tensor-Shape": ",".join(map(str, shape))},
        )
        # A fresh JVM spends its first tens of seconds JIT-compiling (measured: C2 alone took a
        # quarter of a core): load every server, baseline included, before measuring it.
        run_closed_loop(target, 16, args.jvm_warmup, warmup=0.0)
        # The shared point runner: each rate starts from an idle server (10 s request timeout).
        at = point_runner(target, duration=args.duration, warmup=args.warmup, arrival="poisson",
                          timeout=10.0, log=lambda line: print(line, flush=True))

        return sweep_rates(at, args.start_rate, max_rate=args.max_rate, factor=args.factor,
                           stop_after_failures=2, refine_steps=args.refine, criteria=criteria)
    finally:
        ts.stop()


def in_process_ceiling(store: Path, model: str, seconds: float) -> dict:
    """ONNX Runtime with no server: one 2-thread session, and one 1-thread session per core."""
    import zipfile

    import onnxruntime as ort

    cores = sorted(os.sched_getaffinity(0))
    batch = 8
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(store / f"{model}.mar") as z:
            z.extract("model.onnx", tmp)
            z.extract("weights.bin", tmp)
        path = str(Path(tmp) / "model.onnx")
        x = np.random.default_rng(0).standard_normal((batch, *SHAPE[1:])).astype(np.float32)

        def session(threads: int):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        def drive(sess, cpu: int | None, counts: list, stop: float):
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            sess.run(None, {"image": x})
            n = 0
            while time.perf_counter() < stop:
                sess.run(None, {"image": x})
                n += batch
            counts.append(n)

        results = {}
        for label, sessions in (("one_session_all_threads", [session(len(cores))]),
                                ("one_session_per_core", [session(1) for _ in cores])):
            counts: list[int] = []
            start = time.perf_counter()
            stop = start + seconds
            pins = [None] if len(sessions) == 1 else cores
            threads = [threading.Thread(target=drive, args=(s, c, counts, stop)) for s, c in zip(sessions, pins, strict=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            results[label] = sum(counts) / (time.perf_counter() - start)
    return {"samples_per_s": results, "best": max(results.values()), "batch": batch}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,googlenet")
    p.add_argument("--rows", default="a,a2,b,b2,b3,c,d", help="subset of a,a2,b,b2,b3,c,d (a2 is row a')")
    p.add_argument("--p99-ms", type=float, default=500.0)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per rate")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds at the start of each rate")
    p.add_argument("--jvm-warmup", type=float, default=30.0, help="seconds of load on each fresh server first")
    p.add_argument("--start-rate", type=float, default=8.0)
    p.add_argument("--factor", type=float, default=1.3)
    p.add_argument("--max-rate", type=float, default=400.0)
    p.add_argument("--refine", type=int, default=3, help="bisection steps after the sweep")
    p.add_argument("--quick", action="store_true", help="short points, no refinement (smoke run)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-bench")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    if args.quick:
        args.duration, args.warmup, args.refine, args.factor, args.jvm_warmup = 4.0, 1.0, 0, 1.6, 5.0
    rows = set(args.rows.split(","))
    criteria = Criteria(p99_ms=args.p99_ms)
    cores = physical_cores()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.work / "store"
    store.mkdir(exist_ok=True)
    body = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32).tobytes()
    report = {"command": shlex.join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine_info(), "criteria": asdict(criteria), "body": f"raw float32 {SHAPE}",
              "settings": {k: getattr(args, k) for k in ("duration", "warmup", "jvm_warmup", "start_rate", "factor", "refine")},
              "models": {}}
    for model in args.models.split(","):
        print(f"== {model}", flush=True)
        entry: dict = {"rows": {}}
        hetserve_mar = build_hetserve_mar(model, store)
        curves: dict[str, list[LoadResult]] = {}
        if "a" in rows:
            print("  a_stock_eager", flush=True)
            sweep = sweep_server(store, build_stock_mar(model, store).name, args.work / "ts-a", body, args, criteria,
                                 base_config=BASELINE / "default.properties")
            entry["rows"]["a_stock_eager"] = json.loads(sweep.to_json())
            curves["a stock BaseHandler (eager)"] = sweep.by_rate()
        if "a2" in rows:
            print("  a2_stock_onnx", flush=True)
            sweep = sweep_server(store, build_stock_onnx_mar(model, store, hetserve_mar).name, args.work / "ts-a2",
                                 body, args, criteria, base_config=BASELINE / "default.properties")
            entry["rows"]["a2_stock_onnx"] = json.loads(sweep.to_json())
            curves["a' stock BaseHandler (ONNX Runtime)"] = sweep.by_rate()
        for key, config in HETSERVE_ROWS.items():
            if key.split("_")[0] not in rows:
                continue
            print(f"  {key}", flush=True)
            variant = with_config(hetserve_mar, store / f"{model}-{key}.mar", fill(config, cores))
            sweep = sweep_server(store, variant.name, args.work / f"ts-{key}", body, args, criteria)
            entry["rows"][key] = {**json.loads(sweep.to_json()), "config": fill(config, cores)}
            curves[key.replace("_", " ", 1)] = sweep.by_rate()
        if "d" in rows:
            print("  d_in_process_ort", flush=True)
            entry["rows"]["d_in_process_ort"] = in_process_ceiling(store, model, args.duration)
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
