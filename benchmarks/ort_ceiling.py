"""How fast this machine runs a model in process (ONNX Runtime, no server): the yardstick that makes
serving figures from different days comparable. Shared build machines vary from day to day.

Rows: one session with 1 thread and with one thread per physical core (ORT's defaults, unpinned);
one session over every core pinned as hetserve's CPU executor pins a group
(``one_session_all_cores_pinned``); and one single-thread session per physical core run side by
side (``session_per_core``: the data-parallel layout, pinned the same way); each at every
``--batches``. The ceiling at
``--batch`` is the best row at that batch, named by its layout
(``hetserve.benchmarking.harness.in_process_ceiling``).

    .venv/bin/python benchmarks/ort_ceiling.py --mar /tmp/hetserve-bench/store/resnet18.mar
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from handlers.artifact.contract import read_archive  # noqa: E402
from hetserve.benchmarking.harness import (  # noqa: E402
    ONE_SESSION_ALL_CORES,
    ONE_SESSION_ALL_CORES_PINNED,
    SESSION_PER_CORE,
    one_pinned_session_samples_per_s,
    one_session_samples_per_s,
    physical_cores,
    session_per_core_samples_per_s,
    whole_model_files,
)
from hetserve.machine import machine_info, run_record  # noqa: E402


def measure_rows(whole: Path, cores: int, batches: list[int], seconds: float) -> list[dict]:
    """Every layout at every batch; ``threads`` is the threads of all its sessions together."""
    rows = []
    for threads in sorted({1, cores}):
        layout = ONE_SESSION_ALL_CORES if threads == cores else "one_session_one_thread"
        for b in batches:
            rows.append({"layout": layout, "sessions": 1, "threads": threads, "batch": b,
                         "samples_per_s": round(one_session_samples_per_s(whole, threads, b, seconds), 1)})
    if cores > 1:
        for b in batches:
            rows.append({"layout": ONE_SESSION_ALL_CORES_PINNED, "sessions": 1, "threads": cores, "batch": b,
                         "samples_per_s": round(one_pinned_session_samples_per_s(whole, b, seconds, cores), 1)})
        for b in batches:
            rows.append({"layout": SESSION_PER_CORE, "sessions": cores, "threads": cores, "batch": b,
                         "samples_per_s": round(session_per_core_samples_per_s(whole, b, seconds, cores), 1)})
    return rows


def best_row(rows: list[dict], batch: int) -> dict:
    """The in-process ceiling at ``batch``: the fastest row, with its layout named."""
    at = [r for r in rows if r["batch"] == batch]
    if not at:
        raise ValueError(f"no row at batch {batch}")
    best = max(at, key=lambda r: r["samples_per_s"])
    return {"batch": batch, "samples_per_s": best["samples_per_s"], "layout": best["layout"],
            "threads": best["threads"], "sessions": best["sessions"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mar", type=Path, required=True, help="a hetserve .mar (its whole model is timed)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per row")
    parser.add_argument("--batches", default="1,4,8", help="batch sizes, comma-separated")
    parser.add_argument("--batch", type=int, default=4, help="the batch the ceiling is reported at")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ort_ceiling.json")
    args = parser.parse_args()
    batches = sorted({int(b) for b in args.batches.split(",")} | {args.batch})
    cores = physical_cores()
    with tempfile.TemporaryDirectory() as tmp:
        whole, _ = whole_model_files(args.mar, Path(tmp))
        rows = measure_rows(whole, cores, batches, args.seconds)
    result = {**run_record(), "machine": machine_info(), "model": read_archive(args.mar).manifest.model_name,
              "physical_cores": cores, "rows": rows, "ceiling": best_row(rows, args.batch)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for row in rows:
        print(row)
    print("ceiling:", result["ceiling"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
