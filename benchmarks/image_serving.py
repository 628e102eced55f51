"""JPEGs in, labels out: hetserve's image processor against stock TorchServe, one run, one box.

Rows, each a fresh TorchServe on 127.0.0.1 driven over REST by the open-loop generator (Poisson
arrivals) with the same JPEGs (Pillow-made photos-sized images, round-robin), the same
model-config (1 worker, batchSize 8, maxBatchDelay 10):

  a_stock_ort_pillow    TorchServe's BaseHandler serving the archive's own model.onnx through
                        its ONNX Runtime path, preprocess = the same Pillow steps
                        (benchmarks/baseline/ort_image_handler.py), TorchServe's defaults
  b_hetserve_whole      hetserve archive with the image processor and labels, whole model,
                        one core group
  c_hetserve_pipeline   the same archive, head and tail on two core groups

Reported per row: the highest offered rate with p99 <= --p99-ms (>= 95% served, <= 1% errors),
and its latency curve. "How much of a request the decode takes": in process, the mean time of
the image processor (decode + resize + crop + normalise) per JPEG against one single-thread ORT
run of one sample.

    python benchmarks/image_serving.py                 # resnet18, full sweep (needs a quiet box)
    python benchmarks/image_serving.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from hetserve.benchmarking.harness import (
    CPU_ROWS,
    SERVING,
    Load,
    SweepSettings,
    add_sweep_arguments,
    fill,
    hetserve_archive,
    physical_cores,
    report_header,
    stock_archive,
    sweep_server,
    whole_model_files,
)
from hetserve.knee import Criteria, plot_curves
from hetserve.loadgen import LoadResult
from partitioner.archive import with_config

BENCHMARKS = Path(__file__).resolve().parent
BASELINE = BENCHMARKS / "baseline"
LABELS = [f"class-{i}" for i in range(1000)]


def jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Photo-sized JPEGs (640x480 and 480x640, quality 90), different content each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        width, height = (640, 480) if i % 2 == 0 else (480, 640)
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / width, y * 255 / height, (x * y) % 255], -1)
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def build_hetserve_image_mar(model: str, store: Path, labels: Path) -> Path:
    return hetserve_archive(store, f"{model}_img", f"zoo:{model}", "--ratios", "0.5,0.8",
                            "--image-processor", "imagenet", "--labels", str(labels))


def build_stock_ort_mar(hetserve_mar: Path, store: Path, labels: Path, config: dict) -> Path:
    """The hetserve archive's own model.onnx (+ weights.bin) behind BaseHandler's ORT path."""
    name = "stock_ort_image"
    if (store / f"{name}.mar").exists():
        return store / f"{name}.mar"
    with tempfile.TemporaryDirectory() as tmp:
        whole, weights = whole_model_files(hetserve_mar, Path(tmp))
        (Path(tmp) / "labels.json").write_text(labels.read_text())
        return stock_archive(store, name, BASELINE / "ort_image_handler.py", serialized_file=whole,
                             extra_files=[*weights, Path(tmp) / "labels.json"], config=config)


def decode_share(mar: Path, bodies: list[bytes], repeats: int) -> dict:
    """In process: the image processor's time per JPEG vs one ORT run of one sample (1 thread)."""
    import onnxruntime as ort
    import yaml

    from handlers.processors.config import ImageConfig
    from handlers.processors.image import decode_image

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(mar) as z:
        z.extract("model.onnx", tmp)
        z.extract("weights.bin", tmp)
        image = yaml.safe_load(z.read("model-config.yaml"))["hetserve"]["processors"]["image"]
        config = ImageConfig.from_mapping(image)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(Path(tmp) / "model.onnx"), options, providers=["CPUExecutionProvider"])
        pixels = decode_image(bodies[0], config)[None]
        session.run(None, {"image": pixels})
        started = time.perf_counter()
        for i in range(repeats):
            decode_image(bodies[i % len(bodies)], config)
        decode_ms = (time.perf_counter() - started) * 1e3 / repeats
        started = time.perf_counter()
        for _ in range(repeats):
            session.run(None, {"image": pixels})
        run_ms = (time.perf_counter() - started) * 1e3 / repeats
    return {"decode_ms_per_jpeg": round(decode_ms, 2), "ort_1thread_ms_per_sample": round(run_ms, 2),
            "decode_share_of_decode_plus_run": round(decode_ms / (decode_ms + run_ms), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--rows", default="a,b,c", help="subset of a,b,c")
    p.add_argument("--images", type=int, default=16, help="distinct JPEGs sent round-robin")
    add_sweep_arguments(p)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-image-bench")
    p.add_argument("--out", type=Path, default=BENCHMARKS / "results")
    args = p.parse_args()
    settings = SweepSettings.from_args(args)
    rows = set(args.rows.split(","))
    criteria = Criteria(p99_ms=args.p99_ms)
    cores = physical_cores()
    store = args.work / "store"
    store.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    labels = args.work / "labels.json"
    labels.write_text(json.dumps(LABELS))
    bodies = jpegs(args.images)
    hetserve_mar = build_hetserve_image_mar(args.model, store, labels)
    load = Load(bodies, content_type="image/jpeg")
    report = {**report_header(criteria), "model": args.model,
              "bodies": f"{len(bodies)} JPEGs, {min(map(len, bodies))}-{max(map(len, bodies))} bytes",
              "serving": SERVING, "rows": {}}
    curves: dict[str, list[LoadResult]] = {}
    if "a" in rows:
        print("  a_stock_ort_pillow", flush=True)
        stock = build_stock_ort_mar(hetserve_mar, store, labels, SERVING)
        sweep = sweep_server(store, stock.name, args.work / "ts-a", load, settings, criteria,
                             base_config=BASELINE / "default.properties")
        report["rows"]["a_stock_ort_pillow"] = json.loads(sweep.to_json())
        curves["a stock BaseHandler + ORT + Pillow"] = sweep.by_rate()
    for row, key in (("b", "b_whole_one_group"), ("c", "c_pipeline_two_groups")):
        if row not in rows:
            continue
        name = {"b": "b_hetserve_whole", "c": "c_hetserve_pipeline"}[row]
        print(f"  {name}", flush=True)
        config = fill(CPU_ROWS[key], cores)
        variant = with_config(hetserve_mar, store / f"{args.model}_img-{name}.mar", config)
        sweep = sweep_server(store, variant.name, args.work / f"ts-{name}", load, settings, criteria)
        report["rows"][name] = {**json.loads(sweep.to_json()), "config": config}
        curves[name.replace("_", " ", 1)] = sweep.by_rate()
    report["decode"] = decode_share(hetserve_mar, bodies, repeats=50 if args.quick else 200)
    knees = {k: v.get("knee_rate") or 0.0 for k, v in report["rows"].items()}
    stock_rate = knees.get("a_stock_ort_pillow")
    report["summary"] = {"max_sustained_rps": knees,
                         "vs_stock": {k: round(r / stock_rate, 2) for k, r in knees.items()} if stock_rate else None,
                         "decode": report["decode"]}
    stem = "image_serving_quick" if args.quick else "image_serving"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    if curves:
        plot_curves(curves, args.out / f"{stem}.png", log_y=True, criteria=criteria,
                    title=f"{args.model}: JPEG requests, latency vs offered rate")
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {args.out / stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
