"""Where a served batch's time goes at the knee (issue 19): frontend, worker, handler, stages, client.

Per model and row, one fresh TorchServe serves 8 closed-loop clients sending raw float32
1x3x224x224 bodies. Rows: ``default``, the archive with this checkout's shipped model-config
applied to it (its minWorkers/maxWorkers, batchSize, maxBatchDelay and the load-time layout
check: served as it ships), so a cached archive built before a config change still measures
today's default; ``whole``, the same with the whole model on one core group of every core and
one worker (serving_cpu.py's b row), the row the default must never fall below. Each row records
its worker count (configured, and processes running). Measured per row, over the same window:

- every worker's own spans (``HETSERVE_TRACE_DIR``: ``handlers/observability/tracing.py``, one
  ``spans-<pid>.jsonl`` per worker process, lanes prefixed "w<i>/" when there are several): each
  batch's handle, its decode / assemble / run / encode, each stage's compute, the run phase's
  time outside compute (hand-over between stages), the idle time of every worker and core group
  per batch of that worker;
- the client's send and receive times of each request (same clock, CLOCK_MONOTONIC), matched to
  the batch that answered it: send -> handle start, handle end -> receive;
- TorchServe's own per-request counters from its metrics API (``ts_inference_latency_microseconds``:
  the frontend's receive to its response; ``ts_queue_latency_microseconds``: receive to the
  worker thread taking the request into a batch);
- the CPU time of the load generator (this process), the frontend (java) and the worker over the
  window, as shares of one core;
- then, with the server stopped, the in-process ONNX Runtime ceiling on the same cores (whole
  model, batch = batchSize, the best of three layouts: one session over every physical core,
  unpinned and pinned as hetserve pins, and one single-thread session per core run side by side;
  ``hetserve.benchmarking.harness.in_process_ceiling``).
  Served / ceiling is against the best layout (named), against each layout, and against the best
  less the share of the cores the load generator used; and, in process, the request path's host
  steps timed side by side: decode, assemble (the shipped path against a plain
  ``np.concatenate``), encode.

Writes ``breakdown.json`` (command, machine, every figure) and ``breakdown-<model>-<row>.png``
(the worker's lanes over a short window, drawn by ``benchmarks/timeline.py``).

    python benchmarks/breakdown.py        # both models, both rows: about 6-7 minutes on 2 idle
                                          # cores with the archives cached, 7-8 building them
    python benchmarks/breakdown.py --quick --models resnet18 --rows default --out /tmp/bd   # ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from handlers.observability.tracing import TRACE_DIR_ENV, Span, read_span_file  # noqa: E402
from hetserve.benchmarking.harness import (  # noqa: E402
    hetserve_archive,
    in_process_ceiling,
    physical_cores,
    whole_model_files,
)
from hetserve.benchmarking.timeline_report import clip, served_breakdown  # noqa: E402
from hetserve.loadgen import Target, drive_closed_loop_recorded, run_closed_loop  # noqa: E402
from hetserve.machine import machine_info, run_record  # noqa: E402
from hetserve.tsprocess import start_torchserve  # noqa: E402

SHAPE = (1, 3, 224, 224)
CLIENTS = 8
FRONTEND_COUNTERS = ("ts_inference_requests_total", "ts_inference_latency_microseconds",
                     "ts_queue_latency_microseconds")


# ---------------------------------------------------------------------------- server-side probes


def scrape(url: str) -> dict[str, float]:
    """TorchServe's request counters, summed over its label sets (one model here)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310 - loopback
    totals = dict.fromkeys(FRONTEND_COUNTERS, 0.0)
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if match and match.group(1) in totals:
            totals[match.group(1)] += float(match.group(2))
    return totals


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """User + system CPU seconds of each named group of processes (children not included)."""
    import psutil

    out = {}
    for name, group in pids.items():
        total = 0.0
        for pid in group:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        out[name] = total
    return out


def server_pids(ts) -> dict[str, list[int]]:
    """The frontend (java) and its Python workers (``TorchServe.worker_pids``: the CPU
    launcher's own process, which names the worker script too, is not one)."""
    import psutil

    root = psutil.Process(ts.process.pid)
    frontend = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            if "java" in proc.name() or "model-server.jar" in " ".join(proc.cmdline()):
                frontend.append(proc.pid)
        except psutil.Error:
            continue
    return {"frontend": frontend, "workers": ts.worker_pids()}


class Probe:
    """Counters and CPU times at the measured window's start and end, taken from a thread."""

    def __init__(self, metrics_url: str, pids: dict[str, list[int]]) -> None:
        self.metrics_url, self.pids = metrics_url, pids
        self.marks: list[dict[str, Any]] = []

    def take(self) -> None:
        self.marks.append({"t": time.monotonic(), "counters": scrape(self.metrics_url),
                           "cpu": cpu_seconds(self.pids)})

    def at(self, when: float) -> None:
        time.sleep(max(0.0, when - time.monotonic()))
        self.take()

    def summary(self, requests_ok: int) -> dict[str, Any]:
        first, last = self.marks[0], self.marks[-1]
        wall = last["t"] - first["t"]
        delta = {k: last["counters"][k] - first["counters"][k] for k in FRONTEND_COUNTERS}
        n = delta["ts_inference_requests_total"]
        return {
            "frontend_requests": n,
            "frontend_mean_ms": round(delta["ts_inference_latency_microseconds"] / n / 1e3, 3) if n else None,
            "frontend_queue_mean_ms": round(delta["ts_queue_latency_microseconds"] / n / 1e3, 3) if n else None,
            "cpu_pct_of_one_core": {k: round(100 * (last["cpu"][k] - first["cpu"][k]) / wall, 1)
                                    for k in first["cpu"]},
            "probe_window_s": round(wall, 3),
        }


async def closed_loop(target: Target, duration: float, warmup: float, probe: Probe):
    """``hetserve.loadgen``'s closed loop, keeping each request's record (send and receive times)
    and probing the server at the window's edges (from a thread: a probe must not stall the
    clients' loop)."""
    edges: list[threading.Thread] = []

    def probe_edges(start: float) -> None:
        thread = threading.Thread(target=lambda: (probe.at(start + warmup), probe.at(start + warmup + duration)))
        thread.start()
        edges.append(thread)

    run = await drive_closed_loop_recorded(target, CLIENTS, duration, warmup=warmup, timeout=10.0,
                                           on_start=probe_edges)
    for thread in edges:
        await asyncio.to_thread(thread.join)
    return run


def worker_spans(trace_dir: Path) -> tuple[list[Span], dict[str, int]]:
    """Every worker's spans, lanes prefixed "w<i>/" when there are several span files (one per
    worker process: ``SpanFile`` names them ``spans-<pid>.jsonl``; a restarted worker adds one),
    and which pid each prefix is."""
    files = sorted(trace_dir.glob("spans-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    spans, pids = [], {}
    for i, path in enumerate(files):
        prefix = f"w{i}/" if len(files) > 1 else ""
        pids[prefix.rstrip("/") or "worker"] = int(path.stem.split("-")[1])
        for s in read_span_file(path):
            spans.append(s if not prefix else Span(prefix + s.lane, s.kind, s.name, s.start, s.end, s.batch, s.nbytes))
    return spans, pids


# ---------------------------------------------------------------------------- in-process figures


def host_steps(model_dir: Path, batch: int, repeats: int) -> dict[str, Any]:
    """The request path's host steps in process, microseconds per batch of ``batch`` requests:
    decode, assemble as shipped (``InferenceService._assemble``) and as a plain concatenate of
    the decoded arrays, and the raw encode of one answer."""
    from handlers.artifact.manifest import load_verified_manifest
    from handlers.protocol.codecs import decode_request, encode_response
    from handlers.protocol.validation import RequestLimits
    from handlers.service import assemble_feeds

    manifest = load_verified_manifest(model_dir)
    limits = RequestLimits()
    headers = {"X-Tensor-Shape": ",".join(map(str, SHAPE))}
    rng = np.random.default_rng(0)
    bodies = [bytearray(rng.standard_normal(SHAPE, dtype=np.float32).tobytes()) for _ in range(batch)]

    def decode():
        return [(i, decode_request(b, "application/octet-stream", headers, manifest.inputs, limits,
                                   outputs=manifest.outputs)) for i, b in enumerate(bodies)]

    decoded = decode()
    names = [spec.name for spec in manifest.inputs]
    out = {o.name: rng.standard_normal((1, *[d or 1 for d in o.shape[1:]]), dtype=np.float32)
           for o in manifest.outputs}

    def timed(fn) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return round(1e6 * (time.perf_counter() - started) / repeats, 1)

    return {
        "batch": batch,
        "decode_us": timed(decode),
        "assemble_shipped_us": timed(lambda: assemble_feeds(decoded, manifest.inputs)),
        "assemble_concatenate_us": timed(lambda: {n: np.concatenate([d.arrays[n] for _, d in decoded]) for n in names}),
        "encode_raw_us_per_request": timed(lambda: encode_response(out, decoded[0][1], manifest.outputs)),
    }


def ceiling(mar: Path, batch: int, seconds: float) -> dict[str, Any]:
    """The best in-process layout of the archive's whole model on every physical core (one
    session over all cores, one session per core side by side), named."""
    with tempfile.TemporaryDirectory() as tmp:
        whole, _ = whole_model_files(mar, Path(tmp))
        return in_process_ceiling(whole, batch, seconds)


def versus_ceiling(served: float, ceiling_row: dict[str, Any], load_generator_pct: float) -> dict[str, Any]:
    """Served req/s against the best in-process layout and against each layout; and against the
    best layout less the cores the load generator took (it shares the box: its cost, counted)."""
    cores = ceiling_row["threads"]
    best = ceiling_row["samples_per_s"]
    left = best * max(0.0, 1 - load_generator_pct / (100 * cores))
    return {
        "served_vs_ceiling": round(served / best, 3) if best else None,
        "ceiling_layout": ceiling_row["layout"],
        "served_vs_layout": {name: round(served / row["samples_per_s"], 3) if row["samples_per_s"] else None
                             for name, row in ceiling_row["layouts"].items()},
        "ceiling_less_load_generator": round(left, 2),
        "served_vs_ceiling_less_load_generator": round(served / left, 3) if left else None,
    }


# ---------------------------------------------------------------------------- one model


def row_archives(model: str, store: Path, workers: int | None = None) -> dict[str, Path]:
    """``default``: the archive with the shipped model-config applied, workers included (served
    as it ships); ``whole``: that with the whole model on one group of every core, one worker."""
    import yaml

    from partitioner.archive import with_config
    from partitioner.defaults import MODEL_CONFIG, default_file

    # The cut is whatever ResNet-18/GoogLeNet's coarse graphs allow near 0.5/0.8 (labelled by the
    # ratio it reaches); the default row serves the archive's default partition.
    base = hetserve_archive(store, model, f"zoo:{model}", "--ratios", "0.5,0.8", "--allow-off-target")
    shipped = yaml.safe_load(default_file(MODEL_CONFIG).read_text())
    if workers is not None:  # --workers: what the default would serve with another worker count
        shipped = {**shipped, "minWorkers": workers, "maxWorkers": workers}
    default = with_config(base, store / f"{model}-breakdown-default.mar", shipped)
    cores = physical_cores()
    whole = with_config(default, store / f"{model}-breakdown-whole.mar",
                        {"minWorkers": 1, "maxWorkers": 1,
                         "hetserve": {"ratio": 1.0, "core_groups": f"size:{cores}"}})
    return {"default": default, "whole": whole}


def measure(model: str, row: str, mar: Path, args) -> dict[str, Any]:
    config = _config(mar)
    work = args.work / f"breakdown-{model}-{row}"
    trace_dir = work / "spans"
    trace_dir.mkdir(parents=True, exist_ok=True)
    for old in trace_dir.glob("spans-*.jsonl"):
        old.unlink()
    ts = start_torchserve(work / "ts", mar.parent, {"m": mar.name}, env={TRACE_DIR_ENV: str(trace_dir)})
    try:
        target = Target.create(
            f"http://127.0.0.1:{ts.ports['inference']}/predictions/m",
            np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32).tobytes(),
            {"Authorization": f"Bearer {ts.keys['inference']}", "X-Tensor-Shape": ",".join(map(str, SHAPE))},
        )
        # A fresh JVM JIT-compiles for its first tens of seconds: load it before measuring.
        run_closed_loop(target, CLIENTS, args.jvm_warmup, warmup=0.0)
        pids = server_pids(ts)
        probe = Probe(f"http://127.0.0.1:{ts.ports['metrics']}/metrics", pids)
        run = asyncio.run(closed_loop(target, args.duration, args.warmup, probe))
    finally:
        ts.stop()
    result, (lo, hi) = run.result, run.window
    spans, span_pids = worker_spans(trace_dir)
    ok = [(r.sent, r.done) for r in run.records if r.sent is not None and isinstance(r.outcome, int)
          and 200 <= r.outcome < 300]
    served = served_breakdown(spans, ok, (lo, hi))
    server = probe.summary(result.ok)
    picture = work / "picture.png"
    _draw(spans, (lo, hi), args.window_ms, picture, f"{model}, {row}: worker lanes, {CLIENTS} clients, "
          f"{result.goodput_rps:.1f} req/s")
    png = args.out / f"breakdown-{model}-{row}{'-quick' if args.quick else ''}.png"
    if picture.exists():
        png.write_bytes(picture.read_bytes())
    per_request = served["per_request"]
    frontend_ms = server["frontend_mean_ms"]
    latency = per_request["client_latency_ms"]
    return {
        "archive_config": {k: config.get(k) for k in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")}
        | {"hetserve": config.get("hetserve", {})},
        # As served: the archive's own minWorkers, the worker processes found at the window's
        # start, and whose span file each "w<i>/" lane prefix is.
        "workers": {"configured": config.get("minWorkers"), "running": len(pids["workers"]),
                    "span_files": span_pids},
        # What the worker actually ran (the layout check may have kept the whole model).
        "served_stages": sorted(served["stages"]),
        "load": {"clients": CLIENTS, "served_rps": round(result.goodput_rps, 2), "ok": result.ok,
                 "errors": result.errors, "latency_ms": vars(result.latency_ms),
                 "load_generator_cpu_pct_of_one_core": round(result.cpu_pct, 1)},
        "server": server,
        "worker": served,
        # Derived per request (ms): outside the frontend's own clock (the HTTP hop both ways and
        # the client), and the frontend <-> worker round trip outside the handler (socket, the
        # worker's unpacking and packing, the frontend's batching hand-over), queue excluded.
        "derived_per_request_ms": {
            "client_and_http_outside_frontend": _sub(latency, frontend_ms),
            "frontend_worker_round_trip_outside_handler": _sub(
                _add(per_request["send_to_handle_start_ms"], per_request["handle_end_to_receive_ms"]),
                _add(server["frontend_queue_mean_ms"], _sub(latency, frontend_ms))),
        },
    }


def _add(a, b):
    return None if a is None or b is None else round(a + b, 3)


def _sub(a, b):
    return None if a is None or b is None else round(a - b, 3)


def _unpacked(mar: Path, folder: Path) -> Path:
    # A fresh folder: files of an earlier archive left there are strays the manifest check refuses.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(folder)
    return folder


def _draw(spans: list[Span], window: tuple[float, float], width_ms: float, path: Path, title: str) -> None:
    try:
        from timeline import plot
    except ImportError as exc:  # matplotlib missing: the table still stands
        print(f"no picture: {exc}", flush=True)
        return
    middle = (window[0] + window[1]) / 2
    shown = clip(spans, middle, middle + width_ms / 1e3)
    if shown:
        plot(shown, path, title)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,googlenet")
    parser.add_argument("--rows", default="default,whole", help="subset of default,whole")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before the window")
    parser.add_argument("--jvm-warmup", type=float, default=20.0, help="seconds of load on each fresh server first")
    parser.add_argument("--ceiling-seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=200, help="in-process timing repeats")
    parser.add_argument("--window-ms", type=float, default=400.0, help="span of the picture")
    parser.add_argument("--workers", type=int, default=None,
                        help="serve the default row with this many workers (default: as the shipped model-config says)")
    parser.add_argument("--quick", action="store_true", help="short everything (smoke run)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.jvm_warmup, args.ceiling_seconds, args.repeats = 5.0, 1.0, 3.0, 2.0, 20
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.work / "store"
    store.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "breakdown", **run_record(), "machine": machine_info(),
              "settings": {k: getattr(args, k) for k in ("duration", "warmup", "jvm_warmup", "ceiling_seconds", "workers", "quick")},
              "body": f"raw float32 {SHAPE}", "models": {}}
    rows = [r for r in ("default", "whole") if r in args.rows.split(",")]
    for model in args.models.split(","):
        print(f"== {model}", flush=True)
        archives = row_archives(model, store, args.workers)
        entry: dict[str, Any] = {"rows": {}}
        for row in rows:
            entry["rows"][row] = measure(model, row, archives[row], args)
        # With every server stopped: the ceiling and the host steps on the same, now quiet, cores.
        batch = int(_config(archives["default"]).get("batchSize", 1))
        entry["ceiling"] = ceiling(archives["default"], batch, args.ceiling_seconds)
        entry["host_steps_in_process"] = host_steps(
            _unpacked(archives["default"], args.work / f"breakdown-{model}-model"), batch, args.repeats)
        for row, e in entry["rows"].items():
            e.update(versus_ceiling(e["load"]["served_rps"], entry["ceiling"],
                                    e["load"]["load_generator_cpu_pct_of_one_core"]))
            print(table(f"{model}/{row}", e), flush=True)
        if {"default", "whole"} <= set(entry["rows"]):
            served = {r: entry["rows"][r]["load"]["served_rps"] for r in ("default", "whole")}
            entry["default_vs_whole"] = round(served["default"] / served["whole"], 3) if served["whole"] else None
        print(f"  {model}: ceiling {entry['ceiling']}, host steps {entry['host_steps_in_process']}, "
              f"default/whole {entry.get('default_vs_whole')}", flush=True)
        report["models"][model] = entry
    name = "breakdown_quick.json" if args.quick else "breakdown.json"
    (args.out / name).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out / name}")
    return 0


def table(model: str, e: dict[str, Any]) -> str:
    w, s = e["worker"], e["server"]
    rows = [
        ("served req/s", e["load"]["served_rps"]),
        ("workers (configured / running)", f"{e['workers']['configured']} / {e['workers']['running']}"),
        (f"served / in-process ceiling ({e['ceiling_layout']})", e["served_vs_ceiling"]),
        *((f"served / in-process {k}", v) for k, v in e["served_vs_layout"].items()),
        ("served / ceiling less the load generator's CPU", e["served_vs_ceiling_less_load_generator"]),
        ("stages served", ", ".join(e["served_stages"])),
        ("client latency mean ms", w["per_request"]["client_latency_ms"]),
        ("frontend receive->response ms (TorchServe)", s["frontend_mean_ms"]),
        ("frontend queue ms (TorchServe)", s["frontend_queue_mean_ms"]),
        ("client send -> handle start ms", w["per_request"]["send_to_handle_start_ms"]),
        ("handle end -> client receive ms", w["per_request"]["handle_end_to_receive_ms"]),
        ("frontend<->worker round trip outside handler ms", e["derived_per_request_ms"]["frontend_worker_round_trip_outside_handler"]),
        *((f"per batch {k}", v) for k, v in w["per_batch"].items()),
        *((f"stage {k} mean run ms", v["mean_run_ms"]) for k, v in w["stages"].items()),
        *((f"worker {k}: batches, mean handle ms", f"{v['batches']}, {v['handle_ms']}")
          for k, v in w.get("workers", {}).items()),
        *((f"idle {k} ms per batch of its worker", v["idle_ms_per_batch"]) for k, v in w["idle"].items()),
        *((f"CPU % of one core: {k}", v) for k, v in s["cpu_pct_of_one_core"].items()),
        ("CPU % of one core: load generator", e["load"]["load_generator_cpu_pct_of_one_core"]),
    ]
    return "\n".join(f"  {model:18s} {k:52s} {v}" for k, v in rows)


def _config(mar: Path) -> dict[str, Any]:
    import yaml

    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml")) or {}


if __name__ == "__main__":
    raise SystemExit(main())
