#!/usr/bin/env bash
# Issues 8 and 9 on nvidia-h200-x2, in one device call of about 7 minutes (BUDGET_S, default 420):
#   run(kind="nvidia-h200-x2", carry=[".whl"], timeout_s=600, command="bash eval/gpu_perf_runs.sh")
# .whl/ holds the wheels of ../shared/tools/gpu-wheels.sh (deepspeed, datasets, ...), installed here first.
# Runs, by priority, each under its own timeout, each writing its JSON into $OUT after every measurement:
#   1. LLaMA-2-7B shape on 1 GPU (GPU 0) and, at the same time, LLaMA-3-8B shape on 1 GPU (GPU 1)
#   2. LLaMA-2-7B shape on 2 GPUs, with two plain variants (no recompute, micro-batch 4 and 8) and the profile
#   3. LLaMA-3-70B shape truncated to 3 blocks on 2 GPUs (issue 9: per-block event time, memory)
#   4. LLaMA-3-8B shape on 2 GPUs, only if at least 120 s of the budget are left
# then eval/perf_table.py writes $OUT/perf.md and prints it. At most 8 files come back from $OUT: 5 JSON,
# runs.log (the tail of every run's output) and perf.md.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=8
OUT=${OUT:-/tmp/perf_out}
mkdir -p "$OUT" /tmp/perf_logs
start=$(date +%s)
budget=${BUDGET_S:-420}
left() { echo $(( budget - ($(date +%s) - start) )); }

if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

# For a CPU smoke run of this script with a tiny config only (leave them unset on the GPUs): CFG_7B / CFG_8B /
# CFG_70B, GPU_A / GPU_B (the two 1-GPU runs' --include), EXTRA (appended to every bench's arguments; later wins).
CFG_7B=${CFG_7B:-eval/configs/llama2_7b_shape} CFG_8B=${CFG_8B:-eval/configs/llama3_8b_shape}
CFG_70B=${CFG_70B:-eval/configs/llama3_70b_shape} GPU_A=${GPU_A:-localhost:0} GPU_B=${GPU_B:-localhost:1}
read -r -a extra <<< "${EXTRA:-}"
common=(--seq 1024 --micro-batch 4 --grad-ckpt --lora-r 16 --warmup 2 --steps 5 --event-every 3
        --calib-samples 32 --calib-seq 2048 --calib-micro-batch 4)

run() {  # NAME SECONDS LAUNCHER-ARGS... -- SCRIPT-ARGS...
  local name=$1 seconds=$2; shift 2
  local t0=$(date +%s)
  timeout --kill-after=15 "$seconds" deepspeed "$@" "${extra[@]}" > "/tmp/perf_logs/$name.log" 2>&1
  local rc=$?
  { echo "===== $name rc=$rc seconds=$(( $(date +%s) - t0 ))"; grep '^\[bench\]' "/tmp/perf_logs/$name.log" | cut -c1-400
    echo "----- last lines"; grep -v -e 'Warning' -e 'warnings.warn' -e '^\s*$' -e '\[INFO\]' -e '^\[bench\]' \
      "/tmp/perf_logs/$name.log" | tail -n 25 | cut -c1-400; } >> "$OUT/runs.log"
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/runs.log"

# 1. one GPU each, in parallel
run 7b_1gpu 160 --include "$GPU_A" --master_port 29511 eval/bench_scale.py \
  --config-dir "$CFG_7B" "${common[@]}" --variant nockpt:4 --variant nockpt:8 \
  --out "$OUT/bench_7b_1gpu.json" &
run 8b_1gpu 160 --include "$GPU_B" --master_port 29512 eval/bench_scale.py \
  --config-dir "$CFG_8B" "${common[@]}" --out "$OUT/bench_8b_1gpu.json" &
wait

# 2. the 7B shape on two GPUs, with the profile (90 s kept for step 3)
run 7b_2gpu "$(( $(left) - 90 < 170 ? $(left) - 90 : 170 ))" --num_gpus 2 --master_port 29513 eval/bench_scale.py \
  --config-dir "$CFG_7B" "${common[@]}" --variant nockpt:4 --variant nockpt:8 --profile \
  --out "$OUT/bench_7b_2gpu.json"

# 3. issue 9: 70B shapes, 3 blocks
if [ "$(left)" -gt 40 ]; then
  run 70b_blocks "$(( $(left) < 110 ? $(left) : 110 ))" --num_gpus 2 --master_port 29514 eval/bench_70b_blocks.py \
    --config-dir "$CFG_70B" --layers 3 --seq 1024 --micro-batch 1 --calib-samples 16 --calib-seq 2048 \
    --calib-micro-batch 2 \
    --out "$OUT/bench_70b_blocks.json"
fi

# 4. the 8B shape on two GPUs, if time is left
if [ "$(left)" -ge 120 ]; then
  run 8b_2gpu "$(left)" --num_gpus 2 --master_port 29515 eval/bench_scale.py \
    --config-dir "$CFG_8B" "${common[@]}" --out "$OUT/bench_8b_2gpu.json"
fi

python3 eval/perf_table.py --out "$OUT/perf.md" "$OUT"/bench_*.json
echo "total seconds: $(( $(date +%s) - start ))"
sed -n '/^## Plain/,/^## Profiles/p' "$OUT/perf.md"
sed -n '/^## LLaMA-3-70B/,$p' "$OUT/perf.md"
