"""The all-gather bandwidth between this machine's GPUs: the ceiling of ZeRO-3's parameter gathers.

Why: in the 2-GPU training-step profile the parameter all-gathers take most of the CUDA time. This measures
what one `all_gather_into_tensor` of each size costs on its own, with no model around it, so the step's
gathers can be compared with what the link gives. Reported per size (bytes each rank contributes): the
median seconds of --repeats calls after one warm-up, algbw = gathered bytes / time, and busbw = algbw ×
(world − 1) / world (the nccl-tests convention, comparable across world sizes), plus whether CUDA reports
peer access between GPU 0 and 1 (NVLink or PCIe peer-to-peer; without it NCCL goes through host memory).
Which transport NCCL chose is in its own log: run with NCCL_DEBUG=INFO and look for "via P2P", "via SHM".

Run: deepspeed --num_gpus 2 eval/bench_allgather.py --out r.json   (NCCL_PROTO etc. are read from the environment)
CPU check: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 eval/bench_allgather.py --sizes-mib 1 4 --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from exert_ds.runtime.dist import finish_launched_rank, init_distributed

MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args()


def gather_seconds(per_rank_bytes: int, repeats: int, device: torch.device) -> float:
    """Median seconds of one all_gather_into_tensor of `per_rank_bytes` bf16 bytes from every rank."""
    world = dist.get_world_size()
    shard = torch.ones(per_rank_bytes // 2, dtype=torch.bfloat16, device=device)
    whole = torch.empty(shard.numel() * world, dtype=torch.bfloat16, device=device)
    acc = get_accelerator()
    dist.all_gather_into_tensor(whole, shard)  # warm-up (and NCCL's lazy setup for this size)
    times = []
    for _ in range(repeats):
        acc.synchronize()
        dist.barrier()
        start = time.perf_counter()
        dist.all_gather_into_tensor(whole, shard)
        acc.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    init_distributed()  # one GPU per rank, as the trainer's ranks
    world, acc = dist.get_world_size(), get_accelerator()
    device = torch.device(acc.current_device_name())
    cuda = torch.cuda.is_available()
    rows = []
    for mib in args.sizes_mib:
        per_rank = int(mib * MIB) // 2 * 2
        seconds = gather_seconds(per_rank, args.repeats, device)
        algbw = per_rank * world / seconds / 1e9
        rows.append(
            {
                "per_rank_mib": mib,
                "seconds": seconds,
                "algbw_gb_s": algbw,
                "busbw_gb_s": algbw * (world - 1) / world,
            }
        )
    if dist.get_rank() == 0:
        doc = {
            "what": "all_gather_into_tensor, bf16, median of --repeats after a warm-up",
            "world_size": world,
            "device": torch.cuda.get_device_name() if cuda else "CPU",
            "peer_access_0_1": torch.cuda.can_device_access_peer(0, 1)
            if cuda and torch.cuda.device_count() > 1
            else None,
            "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "torch": torch.__version__,
            "env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "sizes": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2))
        for row in rows:
            print(f"[bench] {json.dumps(row)}", flush=True)
    finish_launched_rank()


if __name__ == "__main__":
    main()
