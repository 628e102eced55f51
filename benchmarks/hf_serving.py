"""Hugging Face models served on this machine's CPUs: hetserve's best config vs stock TorchServe
serving the same ``.onnx`` through BaseHandler's ONNX Runtime path (the fair baseline), same run.

Models (random weights from configs, no hub download): BERT-base at sequence length 128
(``input_ids`` + ``attention_mask``, dynamic ``seq``) and ViT-base at 224x224. Each server is a
fresh TorchServe on 127.0.0.1 driven by the open-loop generator (Poisson arrivals); the figure is
the highest offered rate with p99 <= --p99-ms, >= 95% served and <= 1% errors. JSON bodies, one
sample each, for both servers.

Needs a quiet machine (nothing else running) and ``pip install "transformers==5.24.0"
torch==2.13.0``. Not run in CI.

    python benchmarks/hf_serving.py                  # both models, full sweep
    python benchmarks/hf_serving.py --models bert --quick
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hetserve.bench import point_runner  # noqa: E402
from hetserve.knee import Criteria, sweep_rates  # noqa: E402
from hetserve.loadgen import (  # noqa: E402
    Target,
    run_closed_loop,
)
from hetserve.machine import machine_info  # noqa: E402
from hetserve.tsprocess import start_torchserve  # noqa: E402
from partitioner.archive import with_config  # noqa: E402

BASELINE = REPO / "benchmarks" / "baseline"
FACTORIES = Path(__file__).resolve().parent / "hf_factories.py"
SEQ = 128
SERVING = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 10}
# hetserve rows tried; the best is reported against the stock row.
HETSERVE_ROWS = {
    "whole_one_group": {**SERVING, "hetserve": {"ratio": 1.0, "core_groups": "size:{cores}"}},
    "whole_group_per_core": {**SERVING, "hetserve": {"ratio": 1.0, "core_groups": "size:1"}},
    "pipeline_two_groups": {
        **SERVING, "hetserve": {"ratio": 0.5, "core_groups": "size:1", "cpu_head_groups": 1},
    },
}
ARCHIVE_ARGS = {
    "bert": ["--dynamic", "input_ids:1=seq", "--dynamic", "attention_mask:1=seq",
             "--dim", f"seq={SEQ}", "--dim", "seq<=512"],
    "vit": [],
}


def body_for(model: str) -> bytes:
    rng = np.random.default_rng(1)
    if model == "bert":
        ids = rng.integers(0, 30522, (1, SEQ)).tolist()
        return json.dumps({"input_ids": ids, "attention_mask": [[1] * SEQ]}).encode()
    return json.dumps({"pixel_values": rng.standard_normal((1, 3, 224, 224)).astype(np.float32).tolist()}).encode()


def build_hetserve(model: str, store: Path) -> Path:
    mar = store / f"{model}.mar"
    if not mar.exists():
        subprocess.run(
            [sys.executable, "-m", "hetserve", "archive", "--model", f"{FACTORIES}:{model}",
             "--model-name", model, "--ratios", "0.5", "--allow-off-target",
             "--export-path", str(store), "--quiet", *ARCHIVE_ARGS[model]],
            check=True, cwd=REPO,
        )
    return mar


def build_stock(model: str, store: Path, hetserve_mar: Path) -> Path:
    """The same ``model.onnx`` hetserve exported (weights inlined), under the stock handler."""
    import zipfile

    import onnx
    import yaml
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    name = f"stock_{model}"
    mar = store / f"{name}.mar"
    if mar.exists():
        return mar
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(hetserve_mar) as z:
            z.extract("model.onnx", tmp)
            z.extract("weights.bin", tmp)
        whole = onnx.load(str(Path(tmp) / "model.onnx"))  # resolves weights.bin
        onnx.save_model(whole, str(Path(tmp) / f"{model}.onnx"))
        config = Path(tmp) / "model-config.yaml"
        config.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 10}))
        generate_model_archive(ModelArchiverConfig(
            model_name=name, handler=str(BASELINE / "stock_onnx_json_handler.py"), version="1.0",
            serialized_file=str(Path(tmp) / f"{model}.onnx"), export_path=str(store), force=True,
            config_file=str(config),
        ))
    return mar


def sweep(store: Path, mar: str, workdir: Path, body: bytes, args, criteria: Criteria):
    ts = start_torchserve(workdir, store, {"m": mar})
    try:
        target = Target.create(
            f"http://127.0.0.1:{ts.ports['inference']}/predictions/m", body,
            {"Authorization": f"Bearer {ts.keys['inference']}", "Content-Type": "application/json"},
        )
        run_closed_loop(target, 16, args.jvm_warmup, warmup=0.0)
        # The shared point runner: each rate starts from an idle server (10 s request timeout).
        at = point_runner(target, duration=args.duration, warmup=args.warmup, arrival="poisson",
                          timeout=10.0, log=lambda line: print(line, flush=True))

        return sweep_rates(at, args.start_rate, max_rate=args.max_rate, factor=args.factor,
                           stop_after_failures=2, refine_steps=args.refine, criteria=criteria)
    finally:
        ts.stop()


def main() -> int:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bert,vit")
    p.add_argument("--p99-ms", type=float, default=500.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--jvm-warmup", type=float, default=30.0)
    p.add_argument("--start-rate", type=float, default=2.0)
    p.add_argument("--factor", type=float, default=1.3)
    p.add_argument("--max-rate", type=float, default=400.0)
    p.add_argument("--refine", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-hf-bench")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    if args.quick:
        args.duration, args.warmup, args.refine, args.factor, args.jvm_warmup = 4.0, 1.0, 0, 1.6, 5.0
    criteria = Criteria(p99_ms=args.p99_ms)
    cores = len(os.sched_getaffinity(0))
    store = args.work / "store"
    store.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": shlex.join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine_info(), "criteria": asdict(criteria), "models": {}}
    for model in args.models.split(","):
        print(f"== {model}", flush=True)
        body = body_for(model)
        mar = build_hetserve(model, store)
        rows = {}
        print("  stock BaseHandler + ORT", flush=True)
        rows["stock_onnx"] = json.loads(sweep(store, build_stock(model, store, mar).name, args.work / f"ts-{model}-stock",
                                   body, args, criteria).to_json())
        for row, config in HETSERVE_ROWS.items():
            text = json.dumps(config).replace('"{cores}"', str(cores)).replace("{cores}", str(cores))
            variant = with_config(mar, store / f"{model}_{row}.mar", json.loads(text))
            print(f"  hetserve {row}", flush=True)
            rows[row] = json.loads(sweep(store, variant.name, args.work / f"ts-{model}-{row}", body, args, criteria).to_json())
        report["models"][model] = rows
    out = args.out / "hf_serving.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
