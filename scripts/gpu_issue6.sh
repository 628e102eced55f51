#!/usr/bin/env bash
# The GPU runs issue 6 still needs, in calls that fit the device tool (10 minutes a command,
# 64 MiB carried a call). Here first: bash scripts/gpu_bundle.sh; bash scripts/gpu_bundle_java.sh
# Then, on the GPU machine, one call per phase, back to back (the machine stays warm 30 s, and
# phase 2 reuses the ORT that phase 1 unpacked):
#   phase 1, carry [".gpu"]:     gpu_check (the review mends and the timeline test) + timelines
#   phase 2, carry [".gpujava"]: real TorchServe: stock BaseHandler vs hetserve, 1 worker
#   phase 3, carry [".gpujava"]: heavier: 4 workers, and batchSize 27 in process
# Usage: bash scripts/gpu_issue6.sh PHASE  (results go to $OUT, or benchmarks/results)
set -uo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
out="${OUT:-benchmarks/results}"
export PYTHONUNBUFFERED=1
eval "$(bash scripts/gpu_env.sh)" || exit 1
model="${MODEL:-googlenet}"
case "${1:?phase 1, 2 or 3}" in
1)
    bash scripts/gpu_check.sh 2>&1 | tail -30
    cp benchmarks/results/gpu-check.json "$out/" 2>/dev/null
    # One rate near row a's knee on the H200 (1,424 req/s at batch 8): busy, not congested.
    for row in a c1 d; do
        python3 benchmarks/timeline.py --model "$model" --row "$row" --rate "${RATE:-800}" \
            --duration 3 --window-ms 40 --out "$out" 2>&1 | tail -2
    done
    ;;
2)
    python3 benchmarks/gpu_torchserve.py --models "$model" --rows e,a,c1,d --workers 1 \
        --out "$out" --tag=-1w 2>&1 | grep -v "^\s*$" | tail -60
    ;;
3)
    python3 benchmarks/gpu_torchserve.py --models "$model" --rows e,a,c1 --workers 4 \
        --out "$out" --tag=-4w 2>&1 | tail -40
    python3 benchmarks/gpu_serving.py --models "$model" --rows a,c1 --batch 27 --tag=-b27 \
        --duration 2 --warmup 0.4 --refine 1 --out "$out" 2>&1 | tail -20
    ;;
*) echo "phase must be 1, 2 or 3" >&2; exit 2 ;;
esac
