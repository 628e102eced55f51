"""Transfer vs compute timeline (issue 6): what each executor, stream and copy engine did.

One configuration is served in process (the batcher of ``gpu_serving.py`` in front of
``InferenceService.handle``) at a fixed Poisson rate, with a ``handlers.observability.tracing.Timeline``
attached to every executor. Written per run:

  timeline-<model>-<row>.json   overlap report over the measured window (how much transfer time
                                ran under compute, how long head and tail computed side by
                                side, how busy each lane was) and the load result
  timeline-<model>-<row>.trace.json   the spans of a short window in Trace Event Format
                                (open in https://ui.perfetto.dev or chrome://tracing)
  timeline-<model>-<row>.png    the same window drawn lane by lane

Rows (``--row``): ``a`` whole model on one CUDA stream; ``c1`` partitioned, dmda over the
stream and the CPU groups; ``c2`` the same with three micro-batches a batch; ``d`` partitioned, tails always on the CPU groups; ``cpu`` the
CPU-only default (heads split over every core group, tails placed by dmda), the one that runs
without a GPU; ``cpu_pipe`` a strict CPU pipeline (heads on one group, tails on the others,
micro-batches of one).

    python benchmarks/timeline.py --model googlenet --row d --rate 400            # on a GPU
    python benchmarks/timeline.py --model resnet18 --row cpu --rate 20 --groups size:1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_serving import FrontEnd, build_model_dir, hetserve_workers, run_open_loop  # noqa: E402

from handlers.observability.tracing import (  # noqa: E402
    HOST,
    LanePrefix,
    Span,
    Timeline,
)
from hetserve.benchmarking.timeline_report import chrome_trace, clip, overlap_report  # noqa: E402
from hetserve.machine import machine_info, run_record  # noqa: E402

ROWS: dict[str, dict[str, Any]] = {
    "a": {"ratio": 1.0, "cuda_streams": 1, "head_devices": "cuda", "micro_batch": 0},
    "c1": {"cuda_streams": 1, "head_devices": "cuda", "micro_batch": 0, "tail_devices": "auto"},
    "c2": {"cuda_streams": 1, "head_devices": "cuda", "micro_batch": -3, "tail_devices": "auto"},
    "d": {"cuda_streams": 1, "head_devices": "cuda", "micro_batch": 0, "tail_devices": "cpu"},
    # CPU only, as shipped: heads split over every group, each tail placed by dmda.
    "cpu": {"head_devices": "cpu", "tail_devices": "cpu"},
    # CPU only, a strict two-group pipeline: heads on the first group, tails on the others,
    # micro-batches of 1 so that head i+1 can run beside tail i.
    "cpu_pipe": {"head_devices": "cpu", "tail_devices": "cpu", "cpu_head_groups": 1,
                 "micro_batch": 1},
}
COLOURS = {"head": "#1f77b4", "tail": "#ff7f0e", "whole": "#2ca02c", "decode": "#8c564b",
           "assemble": "#e377c2", "run": "#bbbbbb", "encode": "#17becf"}
TRANSFER_COLOUR = "#d62728"


def plot(spans: list[Span], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    origin = min(s.start for s in spans)
    # Worker by worker ("w0/...", "w1/..."), its handler lane first.
    lanes = sorted({s.lane for s in spans},
                   key=lambda lane: (lane.split("/")[0] if lane[:1] == "w" and "/" in lane else "",
                                     not lane.endswith("handler"), lane))
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(lanes) + 1.6))
    for row, lane in enumerate(lanes):
        for s in (s for s in spans if s.lane == lane):
            colour = TRANSFER_COLOUR if s.kind == "transfer" else COLOURS.get(s.name, "#9467bd")
            alpha = 0.45 if s.kind == HOST else 0.9
            ax.broken_barh([((s.start - origin) * 1e3, s.seconds * 1e3)], (row - 0.4, 0.8),
                           facecolors=colour, alpha=alpha, edgecolor="none")
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (*COLOURS.values(), TRANSFER_COLOUR)]
    ax.legend(handles, [*COLOURS, "transfer"], loc="upper right", fontsize=8, ncol=5)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="googlenet")
    parser.add_argument("--row", choices=sorted(ROWS), default="d")
    parser.add_argument("--rate", type=float, required=True, help="Poisson requests/s")
    parser.add_argument("--ratio", type=float, default=0.9, help="head share of the cut")
    parser.add_argument("--groups", default="size:4", help="CPU core-group policy")
    parser.add_argument("--batch", type=int, default=8, help="batchSize")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker threads, each with its own service on its share of the cores")
    parser.add_argument("--delay-ms", type=int, default=5, help="maxBatchDelay")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--window-ms", type=float, default=60.0, help="span of the PNG and trace")
    parser.add_argument("--work", type=Path, default=None, help="model directory cache")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--knobs", type=json.loads, default={},
                        help='JSON merged into the row, e.g. {"cuda_graph": true}')
    parser.add_argument("--tag", default="", help="suffix of the result files, after the row")
    args = parser.parse_args()

    device = "cpu" if args.row.startswith("cpu") else "cuda"
    # The GPU model directories are the ones gpu_serving.py builds: one build a device session.
    work = args.work or Path("/tmp/hetserve-gpu" if device == "cuda" else "/tmp/hetserve-timeline-cpu")
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.model, args.ratio, args.batch, work, device)
    manifest = json.loads((model_dir / "hetserve-manifest.json").read_text())
    sample = tuple(manifest["inputs"][0]["shape"][1:])
    knobs = {"ratio": args.ratio, "core_groups": args.groups, **ROWS[args.row], **args.knobs}
    if knobs.get("micro_batch", 0) < 0:  # -k: k micro-batches a batch
        knobs["micro_batch"] = -(-args.batch // -knobs["micro_batch"])
    services, handles = hetserve_workers(model_dir, knobs, args.batch, args.delay_ms, sample,
                                         args.workers)
    timeline = Timeline()
    front = FrontEnd(handles, args.batch, args.delay_ms / 1000.0)
    body = np.random.default_rng(0).standard_normal(sample, dtype=np.float32).tobytes()
    try:
        run_open_loop(front, body, args.rate, 1.0, 0.0, seed=1)  # unmeasured: first-run costs
        for i, service in enumerate(services):
            recorder = LanePrefix(timeline, f"w{i}/") if args.workers > 1 else timeline
            service.timeline = recorder
            for executor in service.runtime.executors.values():
                executor.timeline = recorder
        timeline.clear()
        started = time.perf_counter()
        result = run_open_loop(front, body, args.rate, args.duration, args.warmup, seed=2)
    finally:
        front.close()
        for service in services:
            service.close()
    spans = timeline.spans()
    measured = (started + 0.05 + args.warmup, started + 0.05 + args.warmup + args.duration)
    report = overlap_report(spans, measured)
    # The drawn window: the middle of the measured run, where the pipeline is in steady state.
    middle = (measured[0] + measured[1]) / 2
    window = clip(spans, middle, middle + args.window_ms / 1e3)
    stem = (f"timeline-{args.model}-{args.row}{args.tag}"
            + (f"-{args.workers}w" if args.workers > 1 else ""))
    title = (f"{args.model}, row {args.row}, {args.rate:.0f} req/s offered, batchSize {args.batch}: "
             f"{100 * (report['transfer_hidden_share'] or 0):.0f}% of transfer time under compute")
    if window:
        plot(window, args.out / f"{stem}.png", title)
        (args.out / f"{stem}.trace.json").write_text(json.dumps(chrome_trace(window)) + "\n")
    record = {
        "benchmark": "timeline", **run_record(), "machine": machine_info(),
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "knobs": knobs},
        "executors": [sorted(service.runtime.executors) for service in services],
        "dropped_spans": timeline.dropped,
        "load": json.loads(result.to_json()),
        "overlap": report,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    lanes = ", ".join(f"{k} {100 * v['busy_share']:.0f}%" for k, v in report["lanes"].items())
    phases = ", ".join(f"{k} {1e3 * v['seconds'] / v['count']:.2f}"
                       for k, v in report["host_phases"].items() if "handler/" in k)
    print(f"{stem}: {result.throughput_rps:.1f} req/s, p99 {result.latency_all_ms.p99 or 0:.1f} ms; "
          f"transfer {1e3 * report['transfer_s']:.1f} ms, hidden "
          f"{100 * (report['transfer_hidden_share'] or 0):.0f}%; stages side by side "
          f"{1e3 * report['stages_concurrent_s']:.0f} ms of {1e3 * report['window_s']:.0f}; busy: {lanes}; "
          f"handler ms per batch: {phases}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
