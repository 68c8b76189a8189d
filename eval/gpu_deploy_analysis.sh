#!/usr/bin/env bash
# Issues 16 and 17 in one call on nvidia-h200-x2 (2026-11-30): GPU 0 runs the 2:4 inference bench alone
# (eval/bench_inference.py); GPU 1 runs the analysis reproduction (eval/analysis/run_analysis.sh: five SmolLM2
# experts, then `exert-ds analyze`), and the 7B export sizes (eval/bench_export_size.py, CPU-bound) run beside it.
# Staged before, in the same lease (call 1, carry .stage/a .stage/qd):
#   mkdir -p /root/m && cp .stage/a/part_aa /root/m/ && tar xzf .stage/qd/quality_data.tgz -C /root/m
# This call: carry .stage/b .whl (.whl also holds the compressed-tensors 0.13.0 and loguru wheels).
# Everything lands in $OUT/part_* (the device returns at most 8 files of 16 MiB, two folders deep).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
root=$OUT; mkdir -p "$root/inf" "$root/an" "$root/es"
(CUDA_VISIBLE_DEVICES=0 python3 eval/bench_inference.py --out "$root/inf/inference.json" --budget-s "${INF_BUDGET:-300}" > "$root/inf/log.txt" 2>&1
 python3 eval/inference_table.py "$root/inf/inference.json" --out "$root/inf/inference.md" >> "$root/inf/log.txt" 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 280 python3 eval/bench_export_size.py --config-dir eval/configs/llama2_7b_shape --n-m 2:4 --work-dir /tmp/es24 --out "$root/es/export_size_7b_2of4.json" > "$root/es/log_24.txt" 2>&1; rm -rf /tmp/es24
 timeout 250 python3 eval/bench_export_size.py --config-dir eval/configs/llama2_7b_shape --sparsity 0.5 --work-dir /tmp/es50 --out "$root/es/export_size_7b_50.json" > "$root/es/log_50.txt" 2>&1; rm -rf /tmp/es50) &
CUDA_VISIBLE_DEVICES=1 GPUS=1 DEADLINE="${AN_DEADLINE:-480}" OUT="$root/an" bash eval/analysis/run_analysis.sh > "$root/an_log.txt" 2>&1
wait
for f in "$root/an_log.txt" "$root/inf/log.txt" "$root/es/"log_*.txt; do tail -n 5 "$f"; done
# one tarball in 15 MB parts (the device returns files of at most 16 MiB); here: cat part_* | tar xzf -
tar czf /tmp/all.tgz -C "$root" . && rm -rf "${root:?}"/* && split -b 15m /tmp/all.tgz "$root/part_"
ls -la "$root"
