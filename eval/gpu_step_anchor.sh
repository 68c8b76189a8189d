#!/usr/bin/env bash
# Issue 19 (and issue 17's GPU checks) on one nvidia-h200, in device calls of under 10 minutes each; every run
# writes its JSON into $OUT as soon as it has a number, and runs.log gets the tail of each run's output.
#   run(kind="nvidia-h200", carry=[".whl"], command="bash eval/gpu_step_anchor.sh kernels anchor7b exert7b ...")
# Runs, in the order given (each has its own timeout: the budget left, BUDGET_S in all):
#   kernels:      tests/test_sparse_kernels_cuda.py (exert-ds eval --sparse-kernels 2:4 against dense weights)
#   inference:    eval/bench_inference.py + eval/inference_table.py (issue 17 point 2)
#   anchor7b:     eval/plain_lora_anchor.py, eager, micro-batch 8 without and 4 with recompute, and the forward
#                 over 32 × 2048 calibration tokens (the prune event's reference)
#   anchor7b_compiled: the same at micro-batch 8, torch.compile of each decoder layer
#   exert7b:      eval/bench_scale.py --plain-only, the same two settings, the allocator trace of the last step
#   event7b:      eval/bench_scale.py with events on 32 × 2048 calibration tokens (event / forward in the engine)
#   liger7b:      exert7b with --liger;  anchor7b_liger: anchor7b with --liger
#   granularity7b: exert7b with stage3_module_granularity_threshold (fewer ZeRO-3 hooks)
#   persist7b:    exert7b with ds_configs/zero3_bf16_persistent.json
#   profile4:     4 blocks: profile of one training step, default engine
#   deepcompile4: 4 blocks, --deepcompile (compile seconds = warm-up steps); eager4: the same without
#   anchor8b, exert8b: the 8B (GQA) shape
#   blocks70b:    eval/bench_70b_blocks.py, 3 blocks of the 70B shape with the default DeepSpeed config (issue 19.3)
# (deepcompile4 sets TORCH_CUDA_ARCH_LIST=9.0: DeepSpeed 0.19.8's op builder cannot parse the image's arch list.)
#   adapter7b:    exert7b with train.adapter_dtype model (LoRA in bf16, DeepSpeed's bf16 optimizer keeps float32 masters)
#   best7b, best8b: granularity + adapter dtype together (+ the step's allocator trace);  best7b_liger: and --liger
#   profile4_best: profile4 with granularity + adapter dtype
#   mel7b, mel8b: best7b/best8b with memory_efficient_linear false (torch's F.linear in place of DeepSpeed's
#                 LinearFunctionForZeroStage3, whose backward led the CPU profile); profile4_mel: its 4-block profile
#   deepcompile4_mel: 4 blocks, the mel settings and --deepcompile
#   (Up to call6 of 2026-12-01 ds_configs/zero3_bf16.json was the per-module config of commit a89a67b, and the
#   granularity + F.linear keys were zero3_bf16_fast.json: call6's bench_70b_blocks_1gpu_fast.json and
#   event_7b_fast.json came from runs blocks70b_fast / event7b_fast, which were blocks70b / event7b with
#   --ds-config ds_configs/zero3_bf16_fast.json; those keys are now the default, so blocks70b / event7b run them.)
set -uo pipefail
source eval/gpu_setup.sh || exit 1
OUT=${OUT:-/tmp/step_out}
mkdir -p "$OUT" /tmp/step_logs
start=$(date +%s)
budget=${BUDGET_S:-560}
left() { echo $(( budget - ($(date +%s) - start) )); }
c7=eval/configs/llama2_7b_shape c8=eval/configs/llama3_8b_shape
best=(--zero-set stage3_module_granularity_threshold=100000000 --adapter-dtype model)
bench=(--seq 1024 --micro-batch 4 --grad-ckpt --lora-r 16 --warmup 3 --steps 6 --plain-only --variant nockpt:8)
anchor=(--seq 1024 --variant 8:0 --variant 4:1 --warmup 3 --steps 6 --calib-forward 32:2048:4)

run() {  # NAME COMMAND...
  local name=$1; shift
  local t0=$(date +%s)
  timeout --kill-after=15 "$(left)" "$@" > "/tmp/step_logs/$name.log" 2>&1
  local rc=$?
  { echo "===== $name rc=$rc seconds=$(( $(date +%s) - t0 ))"
    grep -e '^\[bench\]' -e '^\[plain\]' -e 'passed' -e 'failed' "/tmp/step_logs/$name.log" | cut -c1-600
    echo "----- last lines"; grep -v -e 'Warning' -e 'warnings.warn' -e '^\s*$' -e '\[INFO\]' -e '^\[bench\]' \
      "/tmp/step_logs/$name.log" | tail -n 15 | cut -c1-400; } >> "$OUT/runs.log"
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))"
}
ds1=(deepspeed --num_gpus 1 --master_port 29521)

nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv,noheader >> "$OUT/runs.log"
uptime >> "$OUT/runs.log"
for what in "$@"; do
  [ "$(left)" -ge 45 ] || { echo "skipped $what: $(left) s left" | tee -a "$OUT/runs.log"; continue; }
  case $what in
    kernels) run kernels python3 -m pytest -q -p no:cacheprovider tests/test_sparse_kernels_cuda.py ;;
    inference) run inference bash -c "python3 eval/bench_inference.py --out $OUT/inference_raw.json && \
                 python3 eval/inference_table.py $OUT/inference_raw.json --out $OUT/inference.md" ;;
    anchor7b) run anchor7b python3 eval/plain_lora_anchor.py --config-dir $c7 "${anchor[@]}" --out "$OUT/anchor_7b.json" ;;
    anchor7b_compiled) run anchor7b_compiled python3 eval/plain_lora_anchor.py --config-dir $c7 --seq 1024 \
                 --variant 8:0 --warmup 3 --steps 6 --compile regional --out "$OUT/anchor_7b_compiled.json" ;;
    anchor7b_liger) run anchor7b_liger python3 eval/plain_lora_anchor.py --config-dir $c7 "${anchor[@]}" --liger \
                 --out "$OUT/anchor_7b_liger.json" ;;
    anchor8b) run anchor8b python3 eval/plain_lora_anchor.py --config-dir $c8 "${anchor[@]}" --out "$OUT/anchor_8b.json" ;;
    exert7b) run exert7b "${ds1[@]}" eval/bench_scale.py --config-dir $c7 "${bench[@]}" --trace-step --out "$OUT/exert_7b.json" ;;
    exert8b) run exert8b "${ds1[@]}" eval/bench_scale.py --config-dir $c8 "${bench[@]}" --out "$OUT/exert_8b.json" ;;
    event7b) run event7b "${ds1[@]}" eval/bench_scale.py --config-dir $c7 --seq 1024 --micro-batch 4 --grad-ckpt --warmup 2 \
                 --steps 4 --event-every 2 --calib-samples 32 --calib-seq 2048 --calib-micro-batch 4 \
                 --out "$OUT/event_7b.json" ;;
    liger7b) run liger7b "${ds1[@]}" eval/bench_scale.py --config-dir $c7 "${bench[@]}" --liger --label liger \
                 --out "$OUT/exert_7b_liger.json" ;;
    granularity7b) run granularity7b "${ds1[@]}" eval/bench_scale.py --config-dir $c7 "${bench[@]}" \
                 --zero-set stage3_module_granularity_threshold=100000000 --label "module granularity 1e8" \
                 --out "$OUT/exert_7b_granularity.json" ;;
    persist7b) run persist7b "${ds1[@]}" eval/bench_scale.py --config-dir $c7 "${bench[@]}" \
                 --ds-config ds_configs/zero3_bf16_persistent.json --label "every parameter persistent" \
                 --out "$OUT/exert_7b_persistent.json" ;;
    profile4) run profile4 "${ds1[@]}" eval/bench_scale.py --config-dir $c7 --layers 4 "${bench[@]}" --profile-step \
                 --out "$OUT/exert_4blocks_profile.json" ;;
    deepcompile4) run deepcompile4 env TORCH_CUDA_ARCH_LIST=9.0 "${ds1[@]}" eval/bench_scale.py --config-dir $c7 --layers 4 "${bench[@]}" --deepcompile \
                 --profile-step --label deepcompile --out "$OUT/exert_4blocks_deepcompile.json" ;;
    eager4) run eager4 "${ds1[@]}" eval/bench_scale.py --config-dir $c7 --layers 4 "${bench[@]}" --out "$OUT/exert_4blocks.json" ;;
    anchor4) run anchor4 python3 eval/plain_lora_anchor.py --config-dir $c7 --layers 4 --seq 1024 --variant 4:1 \
                 --variant 8:0 --warmup 3 --steps 6 --out "$OUT/anchor_4blocks.json" ;;
    adapter7b) run adapter7b "${ds1[@]}" eval/bench_scale.py --config-dir $c7 "${bench[@]}" --adapter-dtype model \
                 --trace-step --label "adapter dtype model" --out "$OUT/exert_7b_adapter.json" ;;
    best7b) run best7b "${ds1[@]}" eval/bench_scale.py --config-dir $c7 "${bench[@]}" "${best[@]}" --trace-step \
                 --label "granularity 1e8 + adapter dtype model" --out "$OUT/exert_7b_best.json" ;;
    best7b_liger) run best7b_liger "${ds1[@]}" eval/bench_scale.py --config-dir $c7 "${bench[@]}" "${best[@]}" --liger \
                 --label "granularity 1e8 + adapter dtype model + liger" --out "$OUT/exert_7b_best_liger.json" ;;
    best8b) run best8b "${ds1[@]}" eval/bench_scale.py --config-dir $c8 "${bench[@]}" "${best[@]}" \
                 --label "granularity 1e8 + adapter dtype model" --out "$OUT/exert_8b_best.json" ;;
    profile4_best) run profile4_best "${ds1[@]}" eval/bench_scale.py --config-dir $c7 --layers 4 "${bench[@]}" "${best[@]}" \
                 --profile-step --label "granularity 1e8 + adapter dtype model" --out "$OUT/exert_4blocks_profile_best.json" ;;
    mel7b) run mel7b "${ds1[@]}" eval/bench_scale.py --config-dir $c7 "${bench[@]}" "${best[@]}" \
                 --zero-set memory_efficient_linear=false --label "granularity 1e8 + adapter dtype model + F.linear" \
                 --out "$OUT/exert_7b_mel.json" ;;
    mel8b) run mel8b "${ds1[@]}" eval/bench_scale.py --config-dir $c8 "${bench[@]}" "${best[@]}" \
                 --zero-set memory_efficient_linear=false --label "granularity 1e8 + adapter dtype model + F.linear" \
                 --out "$OUT/exert_8b_mel.json" ;;
    profile4_mel) run profile4_mel "${ds1[@]}" eval/bench_scale.py --config-dir $c7 --layers 4 "${bench[@]}" "${best[@]}" \
                 --zero-set memory_efficient_linear=false --profile-step --label "granularity + adapter + F.linear" \
                 --out "$OUT/exert_4blocks_profile_mel.json" ;;
    deepcompile4_mel) run deepcompile4_mel "${ds1[@]}" eval/bench_scale.py --config-dir $c7 --layers 4 "${bench[@]}" \
                 "${best[@]}" --zero-set memory_efficient_linear=false --deepcompile --label "mel + deepcompile" \
                 --out "$OUT/exert_4blocks_deepcompile_mel.json" ;;
    blocks70b) run blocks70b "${ds1[@]}" eval/bench_70b_blocks.py --config-dir eval/configs/llama3_70b_shape --layers 3 \
                 --seq 1024 --micro-batch 1 --calib-samples 16 --calib-seq 2048 --calib-micro-batch 2 \
                 --out "$OUT/bench_70b_blocks_1gpu.json" ;;
    *) echo "unknown run $what" | tee -a "$OUT/runs.log" ;;
  esac
done
