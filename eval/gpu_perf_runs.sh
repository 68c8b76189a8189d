#!/usr/bin/env bash
# Issue 8 on nvidia-h200-x2, in one device call of under 10 minutes (one lease, so that the 1-GPU and 2-GPU step
# times compare runs on the same machine):
#   run(kind="nvidia-h200-x2", carry=[".whl"], timeout_s=600, command="bash eval/gpu_perf_runs.sh 7b full plain1 persistent")
# .whl/ holds the wheels of ../shared/tools/gpu-wheels.sh (deepspeed, datasets, ...), installed by gpu_setup.sh.
# The first argument picks the model shape (7b: LLaMA-2-7B, 8b: LLaMA-3-8B), the others the runs, in order:
#   full:       2 GPUs: plain steps, the calibration forward, the schedule's event, a TF32 event, the allocator trace
#               of one more event, and two plain variants (no recompute at micro-batch 8, recompute at 16);
#   plain1:     1 GPU, plain steps only (primary and the same variants), for the 1→2 GPU scaling;
#   persistent: 2 GPUs, plain steps with ds_configs/zero3_bf16_persistent.json (every parameter persistent: the
#               frozen base is gathered once and kept whole on every GPU; LoRA and its optimizer stay sharded);
#   persistent1: 1 GPU, the same plain steps with the same config (the scaling pair of `persistent`);
#   profile:    2 GPUs, the model cut to 4 blocks, with the profiles of one training step and one event;
#   profile1:   the same on 1 GPU;
#   events:     2 GPUs: plain steps, the calibration forward, the schedule's event and a TF32 event (`full` less the
#               trace and the variants);
#   persistent_events: `events` with ds_configs/zero3_bf16_persistent.json;
#   simple:     2 GPUs, plain steps (primary only) with NCCL_PROTO=Simple (NCCL's bulk protocol forced);
#   allgather:  2 GPUs, eval/bench_allgather.py (the link's all-gather bandwidth), with NCCL's default protocol and
#               with NCCL_PROTO=Simple; NCCL_DEBUG=INFO's transport lines ("via P2P/SHM") go into runs.log.
# Calibration: 128 × 2048 tokens (issue 8's default). Every run has its own timeout (the budget left, BUDGET_S in
# all) and writes its JSON into $OUT after each measurement; runs.log gets the tail of each run's output.
set -uo pipefail
source eval/gpu_setup.sh || exit 1
OUT=${OUT:-/tmp/perf_out}
mkdir -p "$OUT" /tmp/perf_logs
start=$(date +%s)
budget=${BUDGET_S:-570}
left() { echo $(( budget - ($(date +%s) - start) )); }

shape=${1:?usage: gpu_perf_runs.sh 7b|8b RUN...}; shift
# For a CPU smoke run of this script with a tiny config only (leave them unset on the GPUs): CFG (the model's
# config folder), GPU_A (the 1-GPU run's --include), EXTRA (appended to every bench_scale.py's arguments; later wins).
case $shape in 7b) cfg=eval/configs/llama2_7b_shape ;; 8b) cfg=eval/configs/llama3_8b_shape ;;
  *) echo "unknown shape $shape: 7b or 8b"; exit 2 ;; esac
CFG=${CFG:-$cfg} GPU_A=${GPU_A:-localhost:0}
read -r -a extra <<< "${EXTRA:-}"
common=(--seq 1024 --micro-batch 4 --grad-ckpt --lora-r 16 --warmup 2 --steps 5 --event-every 3
        --calib-samples 128 --calib-seq 2048 --calib-micro-batch 4)
variants=(--variant nockpt:8 --variant ckpt:16)

run() {  # NAME SECONDS LAUNCHER-ARGS... -- SCRIPT-ARGS...
  local name=$1 seconds=$2; shift 2
  local t0=$(date +%s)
  local args=("$@")
  [[ " $* " == *" eval/bench_scale.py "* ]] && args+=("${extra[@]}")
  timeout --kill-after=15 "$seconds" deepspeed "${args[@]}" > "/tmp/perf_logs/$name.log" 2>&1
  local rc=$?
  { echo "===== $name rc=$rc seconds=$(( $(date +%s) - t0 ))"; grep '^\[bench\]' "/tmp/perf_logs/$name.log" | cut -c1-400
    echo "----- last lines"; grep -v -e 'Warning' -e 'warnings.warn' -e '^\s*$' -e '\[INFO\]' -e '^\[bench\]' \
      "/tmp/perf_logs/$name.log" | tail -n 25 | cut -c1-400; } >> "$OUT/runs.log"
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/runs.log"
for what in "$@"; do
  [ "$(left)" -ge 40 ] || { echo "skipped $what: $(left) s left"; continue; }
  case $what in
    full) run "${shape}_2gpu" "$(left)" --num_gpus 2 --master_port 29513 eval/bench_scale.py \
            --config-dir "$CFG" "${common[@]}" --memory-trace "${variants[@]}" --out "$OUT/bench_${shape}_2gpu.json" ;;
    plain1) run "${shape}_1gpu_plain" "$(left)" --include "$GPU_A" --master_port 29511 eval/bench_scale.py \
            --config-dir "$CFG" "${common[@]}" --plain-only "${variants[@]}" --out "$OUT/bench_${shape}_1gpu_plain.json" ;;
    persistent) run "${shape}_2gpu_persistent" "$(left)" --num_gpus 2 --master_port 29514 eval/bench_scale.py \
            --config-dir "$CFG" "${common[@]}" --plain-only "${variants[@]}" --ds-config ds_configs/zero3_bf16_persistent.json \
            --label "every parameter persistent (stage3_param_persistence_threshold 1e10)" \
            --out "$OUT/bench_${shape}_2gpu_persistent.json" ;;
    persistent1) run "${shape}_1gpu_persistent" "$(left)" --include "$GPU_A" --master_port 29515 eval/bench_scale.py \
            --config-dir "$CFG" "${common[@]}" --plain-only "${variants[@]}" --ds-config ds_configs/zero3_bf16_persistent.json \
            --label "every parameter persistent (stage3_param_persistence_threshold 1e10)" \
            --out "$OUT/bench_${shape}_1gpu_persistent.json" ;;
    profile1) run "${shape}_4blocks_profile_1gpu" "$(left)" --include "$GPU_A" --master_port 29517 eval/bench_scale.py \
            --config-dir "$CFG" --layers 4 "${common[@]}" --profile --out "$OUT/bench_${shape}_4blocks_profile_1gpu.json" ;;
    events) run "${shape}_2gpu_events" "$(left)" --num_gpus 2 --master_port 29518 eval/bench_scale.py \
            --config-dir "$CFG" "${common[@]}" --out "$OUT/bench_${shape}_2gpu_events.json" ;;
    persistent_events) run "${shape}_2gpu_persistent_events" "$(left)" --num_gpus 2 --master_port 29519 \
            eval/bench_scale.py --config-dir "$CFG" "${common[@]}" --ds-config ds_configs/zero3_bf16_persistent.json \
            --label "every parameter persistent (stage3_param_persistence_threshold 1e10)" \
            --out "$OUT/bench_${shape}_2gpu_persistent_events.json" ;;
    simple) NCCL_PROTO=Simple run "${shape}_2gpu_simple" "$(left)" --num_gpus 2 --master_port 29520 eval/bench_scale.py \
            --config-dir "$CFG" "${common[@]}" --plain-only --label "NCCL_PROTO=Simple" \
            --out "$OUT/bench_${shape}_2gpu_simple.json" ;;
    allgather)
      for proto in default Simple; do
        if [ $proto = default ]; then unset NCCL_PROTO; else export NCCL_PROTO=$proto; fi
        NCCL_DEBUG=INFO run "allgather_$proto" "$(left)" --num_gpus 2 --master_port 29521 eval/bench_allgather.py \
          --out "$OUT/allgather_$proto.json"
        grep -m 6 -E 'via (P2P|SHM|NET)|NCCL version' "/tmp/perf_logs/allgather_$proto.log" | cut -c1-300 >> "$OUT/runs.log"
      done
      unset NCCL_PROTO ;;
    profile) run "${shape}_4blocks_profile" "$(left)" --num_gpus 2 --master_port 29516 eval/bench_scale.py \
            --config-dir "$CFG" --layers 4 "${common[@]}" --profile --out "$OUT/bench_${shape}_4blocks_profile_2gpu.json" ;;
    *) echo "unknown run $what: see the list at the top"; exit 2 ;;
  esac
done
echo "total seconds: $(( $(date +%s) - start ))"
