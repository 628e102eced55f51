#!/usr/bin/env bash
# GPU offload runs (issue 6): timelines, the offload bound, 4-worker in-process sweeps and real
# TorchServe rows, in calls that fit the device tool (10 minutes a command, 64 MiB carried a
# call, 30 minutes of device time a session). Here first:
#   bash scripts/gpu_bundle.sh; bash scripts/gpu_bundle_java.sh
# Then on the GPU machine, one call per phase, in this order (most important first):
#   phase 1, carry [".gpu"]:     gpu_check (timeline test, padded-copy mends) + timelines of
#                                rows a, c1, c2, d and of c1 with 4 workers, then the offload bound
#   phase 2, carry [".gpu"]:     in-process sweeps with 4 workers (a, c1, d; c1 also cut at
#                                0.8) and at batchSize 27 (a, c1, c2 in three micro-batches)
#   phase 3, carry [".gpujava"]: real TorchServe, 1 worker: stock BaseHandler, a, c1
#   phase 4, carry [".gpujava"]: real TorchServe, 4 workers: stock BaseHandler, a, c1
# Phases 3-4 reuse the ORT that an earlier call unpacked into /tmp/site (both bundles together
# pass 64 MiB), so they must follow it while the machine is still warm (30 s). Mind the margin:
# .gpu (60.5 MB) plus the tracked tree (2.7 MB on 2026-11-25) must stay under 64 MiB (67.1 MB).
# Usage: bash scripts/gpu_offload_runs.sh PHASE  (results go to $OUT, or benchmarks/results)
set -uo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
out="${OUT:-benchmarks/results}"
export PYTHONUNBUFFERED=1
eval "$(bash scripts/gpu_env.sh)" || exit 1
model="${MODEL:-googlenet}"
rate="${RATE:-800}"  # busy, not congested: row a held 1,424 req/s at batch 8 on the H200
case "${1:?phase 1, 2, 3 or 4}" in
1)
    bash scripts/gpu_check.sh 2>&1 | tail -25
    cp benchmarks/results/gpu-check.json "$out/" 2>/dev/null
    for row in a c1 c2 d; do
        python3 benchmarks/timeline.py --model "$model" --row "$row" --rate "$rate" \
            --duration 3 --window-ms 40 --out "$out" 2>&1 | tail -1
    done
    python3 benchmarks/timeline.py --model "$model" --row c1 --workers 4 --rate "$rate" \
        --duration 3 --window-ms 40 --out "$out" 2>&1 | tail -1
    python3 benchmarks/offload_bound.py --model "$model" --results "$out"
    ;;
2)
    python3 benchmarks/gpu_serving.py --models "$model" --rows a,c1,d --workers 4 --tag=-4w \
        --duration 2 --warmup 0.4 --refine 1 --out "$out" 2>&1 | grep -v "^INFO" | tail -40
    # A 10% tail bounds any offload gain at 1/0.9 = 1.11x: a heavier tail is needed for 1.15x.
    python3 benchmarks/gpu_serving.py --models "$model" --rows c1 --workers 4 --ratio 0.8 \
        --tag=-4w-r0.8 --duration 2 --warmup 0.4 --refine 1 --out "$out" 2>&1 | grep -v "^INFO" | tail -15
    python3 benchmarks/gpu_serving.py --models "$model" --rows a,c1,c2 --batch 27 --tag=-b27 \
        --duration 2 --warmup 0.4 --refine 1 --out "$out" 2>&1 | grep -v "^INFO" | tail -25
    ;;
3|4)
    workers=$([[ "$1" == 3 ]] && echo 1 || echo 4)
    python3 benchmarks/gpu_torchserve.py --models "$model" --rows e,a,c1 --workers "$workers" \
        --out "$out" --tag="-${workers}w" 2>&1 | grep -v "^\s*$" | tail -50
    ;;
*) echo "phase must be 1, 2, 3 or 4" >&2; exit 2 ;;
esac
