"""The most CPU offload could give, from two measured timelines (issue 6).

Reads ``timeline-<model>-c1.json`` (tails kept on the GPU) and ``timeline-<model>-d.json``
(tails on the CPU core groups) written by ``benchmarks/timeline.py``, takes the mean head and
tail runs per device and the cut tensor's copy, and writes ``offload-bound-<model>.json``: the
share of tails to send to the CPU and the rate gain over GPU-only at best (``hetserve.offload``),
plus the head share a cut would need for the issue's 1.15x goal.

    python3 benchmarks/offload_bound.py --model googlenet --results benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hetserve.machine import run_record  # noqa: E402
from hetserve.offload import head_share_for_gain, inputs_from_runs, offload_bound  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="googlenet")
    parser.add_argument("--gpu-tail-row", default="c1")
    parser.add_argument("--cpu-tail-row", default="d")
    parser.add_argument("--goal", type=float, default=1.15)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default="", help="suffix of both rows' files and of the output")
    args = parser.parse_args()
    gpu_file = f"timeline-{args.model}-{args.gpu_tail_row}{args.tag}.json"
    cpu_file = f"timeline-{args.model}-{args.cpu_tail_row}{args.tag}.json"
    gpu = json.loads((args.results / gpu_file).read_text())
    cpu = json.loads((args.results / cpu_file).read_text())
    batch = int(cpu["settings"]["batch"])
    executors = cpu["executors"][0] if cpu["executors"] and isinstance(cpu["executors"][0], list) else cpu["executors"]
    groups = sum(1 for name in executors if name.startswith("cpu"))
    inputs = inputs_from_runs(gpu["overlap"]["runs"], cpu["overlap"]["runs"], batch, max(groups, 1))
    bound = offload_bound(inputs)
    whole = inputs.gpu_head_ms + inputs.gpu_tail_ms
    record = {
        "benchmark": "offload_bound", **run_record(), "model": args.model, "batch": batch,
        "from": [gpu["command"], cpu["command"]],
        "inputs": asdict(inputs), "bound": bound.to_dict(),
        "measured_head_share": inputs.gpu_head_ms / whole,
        "head_share_for_goal": head_share_for_gain(args.goal), "goal": args.goal,
    }
    out = args.results / f"offload-bound-{args.model}{args.tag}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{args.model}: head {inputs.gpu_head_ms:.2f} + tail {inputs.gpu_tail_ms:.2f} ms on the GPU, "
          f"tail {inputs.cpu_tail_ms:.2f} ms on one of {inputs.cpu_groups} CPU groups, copy "
          f"{inputs.transfer_ms:.2f} ms -> best CPU share {bound.cpu_share:.2f}, gain <= {bound.gain:.3f} "
          f"(ceiling {bound.ceiling:.3f}; {args.goal}x needs a head share <= {head_share_for_gain(args.goal):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
