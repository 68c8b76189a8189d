"""The environment of one single-process exert-ds job among several on one machine (eval/quality/run_all.py and
eval/analysis/run_analysis.py): its own rendezvous port, one GPU picked by slot (within CUDA_VISIBLE_DEVICES when
set), or DeepSpeed's CPU accelerator when there are no GPUs."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def single_process_env(slot: int, gpus: int, threads: int, port_base: int) -> dict[str, str]:
    """os.environ plus a 1-process rendezvous on port `port_base + slot`; GPU `slot % gpus` of those visible."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port_base + slot),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "NCCL_NVLS_ENABLE": "0",
    }
    if gpus:  # CUDA_VISIBLE_DEVICES narrows the choice, as torch reads it
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        devices = visible.split(",") if visible else [str(i) for i in range(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = devices[slot % min(gpus, len(devices))]
    else:
        env["DS_ACCELERATOR"] = "cpu"
    return env
