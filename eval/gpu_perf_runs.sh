#!/usr/bin/env bash
# Issue 8 on nvidia-h200-x2, in two device calls of under 10 minutes each (one lease, so that every 1-GPU and 2-GPU
# figure compares runs on the same machine):
#   run(kind="nvidia-h200-x2", carry=[".whl"], timeout_s=600, command="bash eval/gpu_perf_runs.sh one")
#   run(kind="nvidia-h200-x2", carry=[".whl"], timeout_s=600, command="bash eval/gpu_perf_runs.sh two")
# .whl/ holds the wheels of ../shared/tools/gpu-wheels.sh (deepspeed, datasets, ...), installed by gpu_setup.sh.
#   one: the LLaMA-2-7B shape on 1 GPU (GPU 0) while the LLaMA-3-8B shape runs on 1 GPU (GPU 1); then the 7B shape on
#        2 GPUs with the allocator trace of one event and three plain variants (larger micro-batches).
#   two: the CUDA-only tests; the 8B shape on 2 GPUs; a 4-block 7B run with the step and event profiles.
# Calibration: 128 × 2048 tokens (issue 8's default). Every run has its own timeout and writes its JSON into $OUT
# after each measurement; runs.log gets the tail of each run's output. perf_table.py writes $OUT/perf.md.
set -uo pipefail
stage=${1:?usage: gpu_perf_runs.sh one|two}
source eval/gpu_setup.sh || exit 1
OUT=${OUT:-/tmp/perf_out}
mkdir -p "$OUT" /tmp/perf_logs
start=$(date +%s)
budget=${BUDGET_S:-570}
left() { echo $(( budget - ($(date +%s) - start) )); }

# For a CPU smoke run of this script with a tiny config only (leave them unset on the GPUs): CFG_7B / CFG_8B,
# GPU_A / GPU_B (the two 1-GPU runs' --include), EXTRA (appended to every bench's arguments; later wins).
CFG_7B=${CFG_7B:-eval/configs/llama2_7b_shape} CFG_8B=${CFG_8B:-eval/configs/llama3_8b_shape}
GPU_A=${GPU_A:-localhost:0} GPU_B=${GPU_B:-localhost:1}
read -r -a extra <<< "${EXTRA:-}"
common=(--seq 1024 --micro-batch 4 --grad-ckpt --lora-r 16 --warmup 2 --steps 5 --event-every 3
        --calib-samples 128 --calib-seq 2048 --calib-micro-batch 4)

run() {  # NAME SECONDS LAUNCHER-ARGS... -- SCRIPT-ARGS...
  local name=$1 seconds=$2; shift 2
  local t0=$(date +%s)
  timeout --kill-after=15 "$seconds" deepspeed "$@" "${extra[@]}" > "/tmp/perf_logs/$name.log" 2>&1
  local rc=$?
  { echo "===== $name rc=$rc seconds=$(( $(date +%s) - t0 ))"; grep '^\[bench\]' "/tmp/perf_logs/$name.log" | cut -c1-400
    echo "----- last lines"; grep -v -e 'Warning' -e 'warnings.warn' -e '^\s*$' -e '\[INFO\]' -e '^\[bench\]' \
      "/tmp/perf_logs/$name.log" | tail -n 25 | cut -c1-400; } >> "$OUT/runs_$stage.log"
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/runs_$stage.log"
if [ "$stage" = one ]; then
  run 7b_1gpu 250 --include "$GPU_A" --master_port 29511 eval/bench_scale.py \
    --config-dir "$CFG_7B" "${common[@]}" --out "$OUT/bench_7b_1gpu.json" &
  run 8b_1gpu 250 --include "$GPU_B" --master_port 29512 eval/bench_scale.py \
    --config-dir "$CFG_8B" "${common[@]}" --out "$OUT/bench_8b_1gpu.json" &
  wait
  run 7b_2gpu "$(left)" --num_gpus 2 --master_port 29513 eval/bench_scale.py \
    --config-dir "$CFG_7B" "${common[@]}" --memory-trace --variant nockpt:8 --variant ckpt:16 --variant ckpt:32 \
    --out "$OUT/bench_7b_2gpu.json"
else
  python3 -m pytest -q tests/test_cuda.py 2>&1 | tail -n 3 >> "$OUT/runs_$stage.log"
  run 8b_2gpu 280 --num_gpus 2 --master_port 29515 eval/bench_scale.py \
    --config-dir "$CFG_8B" "${common[@]}" --variant ckpt:16 --out "$OUT/bench_8b_2gpu.json"
  run 7b_4blocks_profile "$(left)" --num_gpus 2 --master_port 29516 eval/bench_scale.py \
    --config-dir "$CFG_7B" --layers 4 "${common[@]}" --profile --out "$OUT/bench_7b_4blocks_profile_2gpu.json"
fi
echo "total seconds: $(( $(date +%s) - start ))"
