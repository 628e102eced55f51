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
import os
import tempfile
from pathlib import Path

import numpy as np

from hetserve.benchmarking.harness import (
    SERVING,
    Load,
    SweepSettings,
    add_sweep_arguments,
    fill,
    hetserve_archive,
    report_header,
    stock_archive,
    sweep_server,
    whole_model_files,
)
from hetserve.knee import Criteria
from partitioner.archive import with_config

BENCHMARKS = Path(__file__).resolve().parent
BASELINE = BENCHMARKS / "baseline"
FACTORIES = BENCHMARKS / "hf_factories.py"
SEQ = 128
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
    return hetserve_archive(store, model, f"{FACTORIES}:{model}", "--ratios", "0.5",
                            "--allow-off-target", *ARCHIVE_ARGS[model])


def build_stock(model: str, store: Path, hetserve_mar: Path) -> Path:
    """The same ``model.onnx`` hetserve exported (weights inlined), under the stock handler."""
    import onnx

    name = f"stock_{model}"
    if (store / f"{name}.mar").exists():
        return store / f"{name}.mar"
    with tempfile.TemporaryDirectory() as tmp:
        whole_path, _ = whole_model_files(hetserve_mar, Path(tmp))
        whole = onnx.load(str(whole_path))  # resolves the external weights
        onnx.save_model(whole, str(Path(tmp) / f"{model}.onnx"))
        return stock_archive(store, name, BASELINE / "stock_onnx_json_handler.py",
                             serialized_file=Path(tmp) / f"{model}.onnx", config=SERVING)


def json_load(body: bytes) -> Load:
    # One Content-Type: sent as an extra header after the generator's own octet-stream one,
    # hetserve read the body as a raw tensor and refused every request (400).
    return Load([body], content_type="application/json")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bert,vit")
    add_sweep_arguments(p, SweepSettings(start_rate=2.0))
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-hf-bench")
    p.add_argument("--out", type=Path, default=BENCHMARKS / "results")
    args = p.parse_args()
    settings = SweepSettings.from_args(args)
    criteria = Criteria(p99_ms=args.p99_ms)
    cores = len(os.sched_getaffinity(0))
    store = args.work / "store"
    store.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {**report_header(criteria), "models": {}}
    for model in args.models.split(","):
        print(f"== {model}", flush=True)
        load = json_load(body_for(model))
        mar = build_hetserve(model, store)
        rows = {}
        print("  stock BaseHandler + ORT", flush=True)
        stock = build_stock(model, store, mar)
        rows["stock_onnx"] = json.loads(sweep_server(store, stock.name, args.work / f"ts-{model}-stock",
                                                     load, settings, criteria).to_json())
        for row, config in HETSERVE_ROWS.items():
            variant = with_config(mar, store / f"{model}_{row}.mar", fill(config, cores))
            print(f"  hetserve {row}", flush=True)
            sweep = sweep_server(store, variant.name, args.work / f"ts-{model}-{row}", load, settings, criteria)
            rows[row] = json.loads(sweep.to_json())
        report["models"][model] = rows
    out = args.out / "hf_serving.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
