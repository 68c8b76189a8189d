"""Checkpoint and expert I/O on a 50%-pruned model under ZeRO-3 (issue 4 points 4 and 6): training-checkpoint
write and read, sparse-expert write (every rank in parallel), and the single-process streaming export with its
peak host memory. Writes one JSON document to --out.

The model is random (config.json only, `init: random`) and pruned to the target sparsity by one prune event
(scorer magnitude, no PBS) on the trainer's own engine (`trainer.build_engine`). Timings are wall-clock between
barriers, so a "GB/s" is bytes over the slowest rank's time. Reads right after writes are likely served from the
page cache: the read figure is an upper bound on what a cold disk gives.

GPU (2×H200):  deepspeed --num_gpus 2 eval/bench_checkpoint.py --out eval/results/checkpoint_io_7b.json
CPU check:     DS_ACCELERATOR=cpu deepspeed --num_gpus 2 eval/bench_checkpoint.py --config-dir DIR \
                   --ds-config ds_configs/zero3_cpu.json --dtype float32 --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
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

from exert_ds.config import ModelConfig, PBSConfig, PruneConfig, RunConfig, TrainConfig  # noqa: E402
from exert_ds.evaluation.sparsity import sparsity_report  # noqa: E402
from exert_ds.model.architecture import unwrap  # noqa: E402
from exert_ds.prune.event import PruneEvent, PruneState  # noqa: E402
from exert_ds.runtime.dist import init_distributed, launched_world_size, shutdown_distributed  # noqa: E402
from exert_ds.runtime.ds_config import load_ds_config  # noqa: E402
from exert_ds.runtime.zero3 import Zero3Backend  # noqa: E402
from exert_ds.storage.checkpoint import TrainPosition, load_checkpoint, save_checkpoint  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results JSON (written by rank 0)")
    parser.add_argument("--config-dir", default=str(REPO / "eval" / "configs" / "llama2_7b_shape"))
    parser.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero3_bf16.json"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--work-dir", default="/tmp/exert_bench_checkpoint", help="where the files go (emptied)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--keep", action="store_true", help="leave the written files in --work-dir")
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
        prune=PruneConfig(scorer="magnitude", sparsity=args.sparsity),
        pbs=PBSConfig(mode="off"),
        train=TrainConfig(output_dir=str(work)),
    )
    engine = trainer.build_engine(cfg, ds_config)
    vocab = unwrap(engine.module).config.vocab_size
    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(rank))
    event = PruneEvent(engine.module, Zero3Backend(), cfg, PruneState())
    prune_s, _ = timed(lambda: event.run(ids, args.sparsity, pbs=False, ema=False))
    sparsity = sparsity_report(engine.module, Zero3Backend().all_reduce)["roles"]

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
    }

    def save() -> None:  # after every phase, so a time limit keeps what was measured (rank 0)
        if rank == 0:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))

    root = work / "checkpoints"
    position = TrainPosition(step=1, events_done=1)
    write_s, path = timed(lambda: save_checkpoint(engine, {}, position, root, "bench", keep=1))
    read_s, _ = timed(lambda: load_checkpoint(engine, path, "bench"))
    if rank == 0:
        total, base = dir_bytes(path), dir_bytes(path, "base-rank*.pt")
        pruned_dense = sum(
            math.prod(e["shape"]) for e in json.loads((path / "manifest.json").read_text())["params"].values()
        )
        pruned_dense *= params[0].ds_tensor.element_size()
        results["training_checkpoint"] = {
            "write_seconds": write_s,
            "read_seconds": read_s,
            "bytes": total,
            "base_partition_bytes": base,
            "base_vs_dense_pruned_weights": base / pruned_dense,
            "write_GBps": total / write_s / GB,
            "read_GBps": total / read_s / GB,
        }
    save()

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
        print(json.dumps(results, indent=2))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
