#!/usr/bin/env bash
# Issue 3.6 on nvidia-h200-x2: the trainer on SmolLM2-135M (dequantised from Q4_1) and on a LLaMA-2-7B-shaped
# random model, one rank per GPU (NGPU overrides), under the deepspeed launcher. The SmolLM2 configs need
# /root/m/smollm2.gguf (smollm2-stage.sh), the 7B one .stage/gpu7b/ (see its YAML); the wheels of gpu-wheels.sh
# installed on PYTHONPATH (eval/gpu_setup.sh). Logs go to $OUT.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
[ -d /root/m/tok ] || [ ! -f /root/m/smollm2.gguf ] || python3 -c "from transformers import AutoTokenizer as T; T.from_pretrained('/root/m', gguf_file='smollm2.gguf').save_pretrained('/root/m/tok')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt"
python3 -c "import torch, deepspeed, transformers, peft, datasets; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__)" >> "$OUT/device.txt"
for job in "$@"; do
  start=$(date +%s)
  deepspeed --num_gpus "${NGPU:-$(nvidia-smi -L | wc -l)}" --module exert_ds train --config "eval/configs/$job.yaml" > "$OUT/$job.log" 2>&1
  echo "$job rc=$? seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
done
