"""Checkpoint and expert I/O on a 50%-pruned model under ZeRO-3 (issue 4 points 4 and 6, issue 18 point 4): the
training checkpoint with the trainer's real EMA state, once per EMA dtype (none, float32, bfloat16): its bytes, the
synchronous write (save and wait for the background writer), the training stall of an asynchronous save (until
save_checkpoint returns: DeepSpeed's engine save and the device-to-host copies) and the resume read; then the
sparse-expert write (every rank in parallel) and the single-process streaming export with its peak host memory.
Writes one JSON document to --out, and with --summary the issue's summary `{"7b": {"ckpt_gb", "stall_s",
"sync_write_s", "read_gbps"}}` for the trainer's default EMA dtype (`summarize`).

The model is random (config.json only, `init: random`), pruned to the target sparsity by one ForeSight prune event
(no PBS) on the trainer's own engine (`trainer.build_engine`); that event leaves the EMA state the trainer would hold
and checkpoint (bfloat16: the same event's float32 scores rounded, as `PruneEvent._remember` holds them). Timings are
wall-clock between barriers, so a "GB/s" is bytes over the slowest rank's time. Before each read every file of the
checkpoint is dropped from the page cache (posix_fadvise DONTNEED after fsync), so reads come from the disk.

GPU (2×H200):  deepspeed --num_gpus 2 eval/bench_checkpoint.py --out $OUT/checkpoint_io_7b.json \
                   --summary $OUT/checkpoint_summary.json
CPU check:     DS_ACCELERATOR=cpu deepspeed --num_gpus 2 eval/bench_checkpoint.py \
                   --config-dir eval/configs/tiny_llama_cpu --ds-config ds_configs/zero3_cpu.json --dtype float32 \
                   --no-expert --out /tmp/bench.json --summary /tmp/summary.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from exert_ds.config import (  # noqa: E402
    DEFAULT_EMA_DTYPE,
    ModelConfig,
    PBSConfig,
    PruneConfig,
    RunConfig,
    TrainConfig,
)
from exert_ds.evaluation.sparsity import sparsity_report  # noqa: E402
from exert_ds.model.architecture import unwrap  # noqa: E402
from exert_ds.prune.event import PruneEvent, PruneState  # noqa: E402
from exert_ds.runtime.dist import finish_launched_rank, init_distributed, launched_world_size  # noqa: E402
from exert_ds.runtime.ds_config import load_ds_config  # noqa: E402
from exert_ds.runtime.zero3 import Zero3Backend  # noqa: E402
from exert_ds.storage.checkpoint import (  # noqa: E402
    TrainPosition,
    load_checkpoint,
    save_checkpoint,
    wait_for_checkpoint,
)
from exert_ds.storage.checkpoint_fields import pack_sparse, pruned_base_weights  # noqa: E402
from exert_ds.storage.expert import MANIFEST, write_expert  # noqa: E402
from exert_ds.train import trainer  # noqa: E402

GB = 1e9
# Run in a fresh process; its RSS is sampled every 5 ms during the export: the growth over the RSS once the
# imports are done is what the export itself holds. The kernel's high-water mark of this process's memory (VmHWM,
# imports included) is reported too; not ru_maxrss, which keeps the forking rank's peak across exec.
EXPORT_PROBE = """
import json, sys, threading, time
import psutil
from exert_ds.storage.export import export_expert
proc, peak, done = psutil.Process(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
base = proc.memory_info().rss
sampler = threading.Thread(target=sample)
sampler.start()
start = time.perf_counter()
export_expert(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)
seconds = time.perf_counter() - start
done.set()
sampler.join()
status = open("/proc/self/status").read().split("VmHWM:")[1]
high_water = int(status.split()[0]) * 1024
print(json.dumps({"seconds": seconds, "rss_after_imports_bytes": base, "peak_rss_sampled_bytes": peak[0],
                  "max_rss_high_water_bytes": high_water}))
"""


def timed(fn) -> tuple[float, object]:
    """Seconds between two barriers around `fn` (the slowest rank's time)."""
    get_accelerator().synchronize()
    dist.barrier()
    start = time.perf_counter()
    result = fn()
    get_accelerator().synchronize()
    dist.barrier()
    return time.perf_counter() - start, result


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


class _NoTokenizer:
    """The benchmark model has no tokenizer; the expert writer only calls save_pretrained on it."""

    def save_pretrained(self, out: Path) -> None:
        pass


def drop_from_page_cache(folder: Path) -> None:
    """Evict every file under `folder` from the page cache (they are fsynced: their pages are clean)."""
    for file in (p for p in folder.rglob("*") if p.is_file()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def stored_bytes(packed: dict) -> int:
    return sum(v.numel() * v.element_size() for v in packed.values() if isinstance(v, torch.Tensor))


def ema_sizes(ema: dict[str, torch.Tensor]) -> dict[str, float]:
    """Bytes of the EMA state over all ranks, raw and through the checkpoint's sparse codec, per pruned weight."""
    local = torch.tensor(
        [
            sum(v.numel() for v in ema.values()),
            sum(v.numel() * v.element_size() for v in ema.values()),
            sum(stored_bytes(pack_sparse(v)) for v in ema.values()),
        ],
        dtype=torch.float64,
    )
    weights, raw, coded = Zero3Backend().all_reduce(local).tolist()
    return {
        "held_weights": weights,
        "raw_bytes": raw,
        "stored_bytes": coded,
        "raw_bytes_per_pruned_weight": raw / weights,
        "stored_bytes_per_pruned_weight": coded / weights,
    }


def summarize(results: dict, key: str = "7b", ema_dtype: str = DEFAULT_EMA_DTYPE) -> dict:
    """The issue's summary from a results JSON of this script: the training checkpoint with the EMA in `ema_dtype`
    (the trainer's default unless given)."""
    row = results["training_checkpoint"][ema_dtype]
    return {
        key: {
            "ckpt_gb": row["bytes"] / GB,
            "stall_s": row["stall_seconds"],
            "sync_write_s": row["sync_write_seconds"],
            "read_gbps": row["read_GBps"],
        }
    }


def measure_checkpoint(
    engine, ema: dict[str, torch.Tensor], root: Path, dense_pruned_bytes: int, warm_read: bool = False
) -> dict:
    """Sync write, async stall, cold (or, with `warm_read`, page-cached) read of one training checkpoint holding
    `ema` (rank 0's view of the files)."""
    rank = dist.get_rank()
    position = TrainPosition(step=1, events_done=1)
    sync_s, path = timed(
        lambda: (save_checkpoint(engine, ema, position, root / "sync", "bench", 1), wait_for_checkpoint())[0]
    )
    stall_s, _ = timed(lambda: save_checkpoint(engine, ema, position, root / "async", "bench", 1))
    complete_s, _ = timed(wait_for_checkpoint)
    scratch = root / "engine-only"
    engine_s, _ = timed(
        lambda: engine.save_checkpoint(str(scratch), tag="engine", save_latest=False, exclude_frozen_parameters=True)
    )
    dist.barrier()
    if rank == 0 and not warm_read:
        drop_from_page_cache(path)
    dist.barrier()
    read_s, _ = timed(lambda: load_checkpoint(engine, path, "bench"))
    out = {}
    if rank == 0:
        total, base = dir_bytes(path), dir_bytes(path, "base-rank*.pt")
        out = {
            "bytes": total,
            "rank_file_bytes": base,
            "engine_bytes": dir_bytes(path / "engine"),
            "dense_pruned_weight_bytes": dense_pruned_bytes,
            "sync_write_seconds": sync_s,
            "stall_seconds": stall_s,
            "stall_over_sync_write": stall_s / sync_s,
            "background_completion_seconds": stall_s + complete_s,
            "engine_save_seconds": engine_s,
            "engine_save_share_of_stall": engine_s / stall_s,
            "read_seconds": read_s,
            "write_GBps": total / sync_s / GB,
            "read_GBps": total / read_s / GB,
        }
    shutil.rmtree(scratch, ignore_errors=True) if rank == 0 else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results JSON (written by rank 0)")
    parser.add_argument("--summary", help="also write the issue's summary JSON here (see summarize)")
    parser.add_argument("--summary-key", default="7b")
    parser.add_argument("--config-dir", default=str(REPO / "eval" / "configs" / "llama2_7b_shape"))
    parser.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero3_bf16.json"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--work-dir", default="/tmp/exert_bench_checkpoint", help="where the files go (emptied)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--no-expert", action="store_true", help="skip the sparse-expert write and the export")
    parser.add_argument("--keep", action="store_true", help="leave the written files in --work-dir")
    parser.add_argument("--warm-read", action="store_true", help="read from the page cache (as the old bench did)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    ds_config = load_ds_config(args.ds_config, launched_world_size())  # checked before the group starts
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    work = Path(args.work_dir)
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    cfg = RunConfig(
        model=ModelConfig(name_or_path=args.config_dir, init="random", dtype=args.dtype, attn_implementation="sdpa"),
        lora={"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        deepspeed=args.ds_config,
        prune=PruneConfig(scorer="foresight", sparsity=args.sparsity),
        pbs=PBSConfig(mode="off"),
        train=TrainConfig(output_dir=str(work)),
    )
    engine = trainer.build_engine(cfg, ds_config)
    vocab = unwrap(engine.module).config.vocab_size
    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(rank))
    state = PruneState(dtype=torch.float32)
    event = PruneEvent(engine.module, Zero3Backend(), cfg, state)
    prune_s, _ = timed(lambda: event.run(ids, args.sparsity, pbs=False, ema=False))
    sparsity = sparsity_report(engine.module, Zero3Backend().all_reduce)["roles"]
    emas = {
        "none": {},
        "float32": state.ema,
        "bfloat16": {k: v.to(torch.bfloat16) for k, v in state.ema.items()},
    }

    params = [p for n, p in engine.module.named_parameters() if "lora_" not in n]
    dense_bytes = sum(p.ds_numel * p.ds_tensor.element_size() for p in params)
    largest = max(p.ds_numel * p.ds_tensor.element_size() for p in params)
    results: dict = {
        "benchmark": "eval/bench_checkpoint.py",
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": get_accelerator().device_name(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "host": platform.node(),
        "world_size": world,
        "config_dir": args.config_dir,
        "dtype": args.dtype,
        "prune_event_seconds": prune_s,
        "measured_sparsity": sparsity,
        "dense_base_bytes": dense_bytes,
        "largest_tensor_bytes": largest,
        "ema": {name: ema_sizes(ema) for name, ema in emas.items() if ema},
        "read_from": "page cache" if args.warm_read else "disk (page cache dropped)",
        "training_checkpoint": {},
    }

    def save() -> None:  # after every phase, so a time limit keeps what was measured (rank 0)
        if rank == 0:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))

    pruned_dense = (
        sum(p.ds_numel for p in pruned_base_weights(engine.module).values()) * params[0].ds_tensor.element_size()
    )
    for name, ema in emas.items():
        row = measure_checkpoint(engine, ema, work / f"checkpoints-{name}", pruned_dense, args.warm_read)
        if rank == 0:
            results["training_checkpoint"][name] = row
            shutil.rmtree(work / f"checkpoints-{name}", ignore_errors=True)
        save()
    if rank == 0 and args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summarize(results, args.summary_key), indent=2) + "\n")

    if not args.no_expert:
        expert_and_export(args, engine, work, results, dense_bytes, largest, params, save)
    if rank == 0:
        print(json.dumps(results, indent=2))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    finish_launched_rank()


def expert_and_export(args, engine, work: Path, results: dict, dense_bytes: int, largest: int, params, save) -> None:
    """The sparse expert written by every rank, then (rank 0) the streaming export in a fresh process."""
    rank = dist.get_rank()
    expert_dir = work / "expert"
    expert_s, _ = timed(lambda: write_expert(engine.module, _NoTokenizer(), expert_dir, sparsity=args.sparsity))
    if rank == 0:
        manifest = json.loads((expert_dir / MANIFEST).read_text())
        written = dir_bytes(expert_dir)
        size = params[0].ds_tensor.element_size()
        tensors = manifest["tensors"].values()
        dense_stored = sum(math.prod(e["shape"]) * size for e in tensors if e["storage"] == "dense")
        pruned_dense = sum(math.prod(e["shape"]) * size for e in tensors if e["storage"] == "sparse")
        sparse_stored = dir_bytes(expert_dir, "expert-rank*.safetensors") - dense_stored  # headers counted here
        results["expert"] = {
            "write_seconds": expert_s,
            "bytes": written,
            "vs_dense_whole_model": written / dense_bytes,
            "pruned_weights_vs_dense": sparse_stored / pruned_dense,
            "write_GBps": written / expert_s / GB,
            "files": len(manifest["files"]),
        }
        save()
        probe = subprocess.run(
            [sys.executable, "-c", EXPORT_PROBE, str(expert_dir), str(work / "hf"), args.max_shard_size],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        export = json.loads(probe.stdout.strip().splitlines()[-1])
        hf_bytes = dir_bytes(work / "hf", "*.safetensors")
        export |= {
            "hf_bytes": hf_bytes,
            "GBps_written": hf_bytes / export["seconds"] / GB,
            "export_rss_growth_bytes": export["peak_rss_sampled_bytes"] - export["rss_after_imports_bytes"],
            "export_rss_growth_over_largest_tensor": (
                export["peak_rss_sampled_bytes"] - export["rss_after_imports_bytes"]
            )
            / largest,
            "export_high_water_growth_over_largest_tensor": (
                export["max_rss_high_water_bytes"] - export["rss_after_imports_bytes"]
            )
            / largest,
        }
        results["export"] = export
        save()


if __name__ == "__main__":
    main()
