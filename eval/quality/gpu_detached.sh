#!/usr/bin/env bash
# The quality cells on one device lease, run detached so that they span several device calls (each call is at most
# 600 s; a process started with setsid outlives its call while the machine is held). The machine is given back 30 s
# after a call ends: issue the calls back to back, with nothing in between, or the runs and their results are lost
# (2026-12-01: a lease was lost that way after its first 9 cells).
#   call 1 (carry .stage/a):               mkdir -p /root/m && cp .stage/a/part_aa /root/m/
#   call 2 (carry .stage/b .whl):          bash eval/quality/gpu_detached.sh stage
#   call 3 (carry .stage/qd):              METHODS=... SPARSITIES=0.5,0.4 SKIP=... DEADLINE=1400 bash eval/quality/gpu_detached.sh start
#                                          (TRACE=1: run_all.py --trace-events, the model before and after every event)
#   calls 4..: (no carry)                  bash eval/quality/gpu_detached.sh wait 560   (the last one also collects)
# `wait` copies quality_raw.json.gz, logs.tar.gz and run_all.log to $OUT whenever it returns.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
Q=/root/qout
case ${1:-} in
  stage)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    cp .stage/b/part_ab /root/m/ && cat /root/m/part_aa /root/m/part_ab > /root/m/smollm2.gguf || exit 1
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /root/m/smollm2.gguf" | sha256sum -c || exit 1
    python3 eval/quality/stage_model.py /root/m/smollm2.gguf /root/m/hf 2>&1 | tail -1 ;;
  start)
    tar xzf .stage/qd/quality_data.tgz -C /root/m || exit 1
    mkdir -p .stage $Q && ln -sfn /root/m/hf .stage/smollm2_hf && ln -sfn /root/m/quality_data .stage/quality_data
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
    setsid nohup python3 eval/quality/run_all.py --out $Q --gpus "${GPUS:-1}" --per-gpu "${PER_GPU:-9}" \
      --deadline-s "${DEADLINE:-1400}" --seeds "${SEEDS:-0,1,2}" --sparsities "${SPARSITIES:-0.5,0.4}" \
      --methods "$METHODS" --skip "${SKIP:-}" $([ "${TRACE:-0}" = 1 ] && echo --trace-events) > $Q/run_all.log 2>&1 < /dev/null &
    sleep 20; tail -3 $Q/run_all.log ;;
  wait)
    end=$(( $(date +%s) + ${2:-560} ))
    while [ "$(date +%s)" -lt "$end" ] && pgrep -f eval/quality/run_all.py > /dev/null; do sleep 5; done
    grep -v "cells evaluated" $Q/run_all.log | tail -40; uptime
    [ -f $Q/quality_raw.json ] && gzip -c $Q/quality_raw.json > "$OUT/quality_raw.json.gz"
    [ -f $Q/logs.tar.gz ] && cp $Q/logs.tar.gz "$OUT/"
    cp $Q/run_all.log "$OUT/" ;;
  *) echo "usage: $0 stage | start | wait SECONDS" >&2; exit 2 ;;
esac
