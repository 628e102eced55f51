#!/usr/bin/env bash
# GPU ceilings, CUDA graphs, stock ORT and a shared GPU (issue 16), in device calls that fit its
# budget: 15 minutes of device time for the whole issue (machine starts, idle time and reruns
# included), 10 minutes a command, 64 MiB carried a call. Here first: bash scripts/gpu_bundle.sh; bash scripts/gpu_bundle_java.sh
# Then on the GPU machine, one call per phase, most important first:
#   phase 1, carry [".gpu"]      gpu_check (CUDA-graph tests included); GoogLeNet cut at $RATIO;
#                                host time per batch with hetserve.cuda_graph off/on (picks the
#                                setting the later rows use); device ceiling; shared-GPU rows: the
#                                co-tenant at $DUTY, GPU-only (a) vs partitioned dmda (c1), then
#                                the same two on the idle GPU; timelines of c1 and d under the
#                                co-tenant and the offload bound from them
#   phase 2, carry [".gpujava"]  real TorchServe, GoogLeNet, 1 and $WORKERS workers: the frontend
#                                ceiling (no-work handler), stock BaseHandler + ORT CUDA (s) and
#                                hetserve GPU-only (a), in one run
#   phase 3, carry [".gpu"]      only if device time is left: NFNet and ViT-B/16, device ceilings,
#                                host time, and GPU-only vs dmda under the co-tenant
# Phase 2 reuses the ORT that phase 1 unpacked into /tmp/site and the model builds in /tmp
# (both bundles together pass 64 MiB), so call it at once after phase 1, while the machine is
# warm (30 s). Each phase starts a step only while its own budget holds the step's estimate and
# cuts the step at what is left ($BUDGET s; defaults 330, 270, 180: about 13 minutes with the
# machine's start, so a failed phase 1 or 2 can be rerun in part), so a call ends inside its
# budget with what it measured in $OUT. The estimates are guesses until a GPU run times them
# (the "took" lines in $OUT/phase*.log say).
# Usage: bash scripts/gpu_ceiling_runs.sh PHASE   (results in $OUT, or benchmarks/results)
#   MODEL=googlenet RATIO=0.8 DUTY=0.5 WORKERS=4 GRAPH=auto|0|1 BUDGET=300 DRY_RUN=1 (print only)
#   DEVICE=cpu runs every step on the CPU (a smoke test of the script, not a figure).
set -uo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
phase="${1:?phase 1, 2 or 3}"
device="${DEVICE:-cuda}"
model="${MODEL:-googlenet}"
ratio="${RATIO:-0.8}"     # a 0.9 head share caps any offload gain at 1/0.9 (hetserve/offload.py)
duty="${DUTY:-0.5}"
workers="${WORKERS:-4}"
case "$phase" in 1) budget=330 ;; 2) budget=270 ;; *) budget=180 ;; esac
budget="${BUDGET:-$budget}"
dry="${DRY_RUN:-0}"
work=/tmp/hetserve-gpu
[[ "$device" == cpu ]] && work=/tmp/hetserve-gpu-ceiling-cpu
mkdir -p "$work"
log="$out/phase$phase.log"
started=$SECONDS
if [[ "$dry" != 1 && "$device" == cuda ]]; then
    eval "$(bash scripts/gpu_env.sh)" || exit 1
fi
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "[$((SECONDS - started)) s] $*" | tee -a "$log"; }

# step ESTIMATE_S LIMIT_S command...: run it if the phase budget still holds its estimate,
# never longer than LIMIT_S; its output goes to the log.
step() {
    local estimate=$1 limit=$2; shift 2
    local left=$((budget - (SECONDS - started)))
    if (( left < estimate )); then
        say "skip ($left s left, needs ~$estimate s): $*"
        return 0
    fi
    (( limit > left )) && limit=$left
    say "run (~$estimate s, at most $limit s): $*"
    [[ "$dry" == 1 ]] && return 0
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | grep -v "^INFO" >> "$log"
    local rc=${PIPESTATUS[0]}
    say "took $((SECONDS - t0)) s, exit $rc"
}

# Steps that need CUDA whatever the knobs say (gpu_serving.py's rows put heads on the GPU).
gpu_step() {
    if [[ "$device" == cpu ]]; then
        say "skip on the CPU (needs CUDA): $*"
        return 0
    fi
    step "$@"
}

# The co-tenant: started pinned to core 0 (the core hetserve keeps for its GPU threads), warm
# before the measured step, stopped by SIGTERM afterwards; it writes its achieved duty cycle.
cotenant_pid=""
cotenant_start() {
    local tag=$1
    say "co-tenant on, duty $duty ($tag)"
    [[ "$dry" == 1 ]] && return 0
    rm -f "$work/cotenant.ready"
    local pin=(taskset -c 0)
    command -v taskset > /dev/null || pin=()
    "${pin[@]}" python3 benchmarks/gpu_cotenant.py --device "$device" --duty "$duty" \
        --ready "$work/cotenant.ready" --out "$out/cotenant-$tag.json" >> "$log" 2>&1 &
    cotenant_pid=$!
    for _ in $(seq 1 300); do
        [[ -f "$work/cotenant.ready" ]] && return 0
        kill -0 "$cotenant_pid" 2>/dev/null || { say "co-tenant died"; cotenant_pid=""; return 1; }
        sleep 0.1
    done
    say "co-tenant not ready after 30 s"
}
cotenant_stop() {
    [[ -z "$cotenant_pid" ]] && return 0
    kill -TERM "$cotenant_pid" 2>/dev/null
    wait "$cotenant_pid" 2>/dev/null
    cotenant_pid=""
    say "co-tenant off"
}
trap cotenant_stop EXIT

# Knobs every hetserve row gets: the CUDA-graph setting phase 1 chose, and a state directory of
# the phase's own, so that no row starts from another row's (or the idle GPU's) history.
knobs() {
    local graph="${GRAPH:-auto}"
    if [[ "$graph" == auto ]]; then
        graph=$(cat "$work/graph-choice" 2>/dev/null || echo 0)
    fi
    local value=false
    [[ "$graph" == 1 ]] && value=true
    echo "{\"cuda_graph\": $value, \"state_dir\": \"$work/state-$1\"}"
}

# Which setting served a batch faster in the host-time step: CUDA graphs on only if they cut the
# handler's median batch time by 3% or more without errors.
choose_graph() {
    [[ "$dry" == 1 ]] && return 0
    python3 - "$out/gpu-ceiling-host-$model.json" "$model" > "$work/graph-choice" 2>> "$log" <<'EOF' || echo 0 > "$work/graph-choice"
import json, sys
rows = json.load(open(sys.argv[1]))["rows"][sys.argv[2]]
off, on = rows["service_graph_off"], rows["service_graph_on"]
faster = on["handle_ms"]["median"] <= 0.97 * off["handle_ms"]["median"]
print(1 if faster and on["errors"] == 0 else 0)
EOF
    say "cuda_graph for the later rows: $(cat "$work/graph-choice")"
}

sweep=(--duration 1.5 --warmup 0.3 --refine 1 --start-rate 200 --delay-ms 5 --batch 8)
[[ "$device" == cpu ]] && sweep=(--duration 0.5 --warmup 0.1 --refine 0 --start-rate 5 --max-rate 20 --delay-ms 5 --batch 8)

case "$phase" in
1)
    if [[ "$device" == cuda ]]; then
        step 60 120 bash scripts/gpu_check.sh
        [[ "$dry" != 1 ]] && cp benchmarks/results/gpu-check.json "$out/gpu-check-16.json" 2>/dev/null
    fi
    # The first step that needs the model builds its directory (export, GPU profile, METIS cut).
    step 90 240 python3 benchmarks/gpu_ceilings.py host --device "$device" --models "$model" \
        --ratio "$ratio" --runs 200 --work "$work" --out "$out" --tag="-$model"
    choose_graph
    step 15 60 python3 benchmarks/gpu_ceilings.py device --device "$device" --models "$model" \
        --ratio "$ratio" --seconds 2 --work "$work" --out "$out" --tag="-$model"
    cotenant_start "$model-sweep"
    gpu_step 60 120 python3 benchmarks/gpu_serving.py --models "$model" --rows a,c1 --ratio "$ratio" \
        --knobs "$(knobs co)" --tag="-co$duty-r$ratio" --work "$work" --out "$out" "${sweep[@]}"
    cotenant_stop
    gpu_step 60 120 python3 benchmarks/gpu_serving.py --models "$model" --rows a,c1 --ratio "$ratio" \
        --knobs "$(knobs idle)" --tag="-idle-r$ratio" --work "$work" --out "$out" "${sweep[@]}"
    # Timelines at 0.8x the GPU-only knee under the co-tenant (busy, not congested); RATE wins.
    rate="${RATE:-$(python3 - "$out/gpu-serving-$model-co$duty-r$ratio.json" 2>/dev/null <<'PY'
import json, sys
rows = {r["name"]: r for r in json.load(open(sys.argv[1]))["rows"]}
print(round(0.8 * rows["a_gpu_whole_1stream"]["knee_rate"]))
PY
)}"
    [[ -z "$rate" || "$rate" == 0 ]] && rate=600
    [[ "$device" == cpu ]] && rate=10
    cotenant_start "$model-timeline"
    for row in c1 d; do
        gpu_step 15 45 python3 benchmarks/timeline.py --model "$model" --row "$row" --rate "$rate" \
            --ratio "$ratio" --knobs "$(knobs "tl-$row")" --tag="-co$duty" --duration 2 \
            --warmup 0.5 --window-ms 40 --work "$work" --out "$out"
    done
    cotenant_stop
    gpu_step 5 30 python3 benchmarks/offload_bound.py --model "$model" --tag="-co$duty" --results "$out"
    ;;
2)
    step 70 150 python3 benchmarks/gpu_ceilings.py frontend --device "$device" --workers "1,$workers" \
        --work "$work" --out "$out" "${sweep[@]}"
    step 200 420 python3 benchmarks/gpu_torchserve.py --models "$model" --rows s,a --ratio "$ratio" \
        --workers "1,$workers" --knobs "$(knobs ts)" --jvm-warmup 5 --work "$work/ts" --from-work "$work" \
        --out "$out" --tag="-16" "${sweep[@]}"
    ;;
3)
    for other in ${MODELS:-nfnet vit-b16}; do
        step 90 180 python3 benchmarks/gpu_ceilings.py device --device "$device" --models "$other" \
            --ratio "$ratio" --seconds 2 --work "$work" --out "$out" --tag="-$other"
        cotenant_start "$other-sweep"
        gpu_step 60 120 python3 benchmarks/gpu_serving.py --models "$other" --rows a,c1 \
            --ratio "$ratio" --knobs "$(knobs "co-$other")" --tag="-co$duty-r$ratio" \
            --work "$work" --out "$out" "${sweep[@]}"
        cotenant_stop
    done
    ;;
*) echo "phase must be 1, 2 or 3" >&2; exit 2 ;;
esac
say "phase $phase done"
