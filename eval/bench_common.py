"""What eval/bench_scale.py and eval/bench_70b_blocks.py share (issues 8 and 9).

The engine is the trainer's own (`trainer.build_engine`, `trainer.train_micro_step`, `event.PruneEvent` with
the run config), on a random-weight model built from a config.json under ZeRO-3; batches are random
token ids (no tokenizer, no data files). Every timing is synchronised and taken as the maximum over ranks.
Results go to one JSON document that rank 0 rewrites after every measurement, so a run that hits its
timeout keeps what it had measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import deepspeed
import deepspeed.comm as dist
import peft
import torch
import transformers
from deepspeed.accelerator import get_accelerator
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from exert_ds.config import (  # noqa: E402
    CalibrationConfig,
    ModelConfig,
    PBSConfig,
    PbsMode,
    PruneConfig,
    RunConfig,
    TrainConfig,
)
from exert_ds.model.architecture import decoder_layers, unwrap  # noqa: E402
from exert_ds.runtime.ds_config import load_ds_config, read_ds_config  # noqa: E402

GIB = 2**30
# Dense bf16 tensor-core peak of one GPU (NVIDIA H100/H200 SXM datasheet, without sparsity), TFLOP/s.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="results JSON, rewritten after every measurement")
    parser.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero3_bf16.json"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--attn", default="sdpa", help="HF attn_implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--seq", type=int, default=1024, help="training sequence length")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pbs", default="hessian", choices=get_args(PbsMode))
    parser.add_argument("--calib-micro-batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="free text stored with the results")
    parser.add_argument("--adapter-dtype", default="model", choices=("float32", "model"), help="train.adapter_dtype")


def run_config(args: argparse.Namespace, config_dir: str, calib_samples: int, calib_seq: int) -> RunConfig:
    """The run YAML's dataclasses, filled from the command line (no data files: batches are random ids)."""
    return RunConfig(
        model=ModelConfig(name_or_path=config_dir, init="random", dtype=args.dtype, attn_implementation=args.attn),
        lora={"r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": 0.0},
        deepspeed=args.ds_config,
        calibration=CalibrationConfig(num_samples=calib_samples, seq_len=calib_seq, micro_batch=args.calib_micro_batch),
        prune=PruneConfig(sparsity=args.sparsity, every_steps=getattr(args, "event_every", None)),
        pbs=PBSConfig(mode=args.pbs),
        train=TrainConfig(gradient_checkpointing=args.grad_ckpt, seed=args.seed, adapter_dtype=args.adapter_dtype),
    )


def ds_config(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON with this run's micro-batch and no accumulation (one micro-batch per step)."""
    raw = read_ds_config(args.ds_config)
    raw["train_micro_batch_size_per_gpu"] = args.micro_batch
    raw["gradient_accumulation_steps"] = 1
    raw.pop("train_batch_size", None)
    return load_ds_config(raw, world)


def model_dir_with_layers(config_dir: str, layers: int | None) -> str:
    """`config_dir` itself, or a private copy of its config.json truncated to `layers` decoder blocks."""
    if layers is None:
        return config_dir
    config = json.loads((Path(config_dir) / "config.json").read_text())
    config["num_hidden_layers"] = layers
    out = Path(tempfile.mkdtemp(prefix="exert_bench_model_"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return str(out)


def sync() -> None:
    get_accelerator().synchronize()


def max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks (the slowest rank sets the pace)."""
    device = torch.device(get_accelerator().current_device_name())
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def per_rank(value: float) -> list[float]:
    """`value` of every rank, in rank order."""
    device = torch.device(get_accelerator().current_device_name())
    t = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    t[dist.get_rank()] = value
    dist.all_reduce(t)
    return t.tolist()


def reset_peaks() -> None:
    """Start a new peak for accelerator memory and for host RSS (VmHWM, where Linux lets us reset it)."""
    sync()
    get_accelerator().reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def host_peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def memory_record() -> dict[str, list[float]]:
    """Accelerator memory allocated now, and the peaks since the last reset_peaks(), per rank, GiB."""
    sync()
    acc = get_accelerator()
    return {
        "allocated_gib": per_rank(acc.memory_allocated() / GIB),
        "peak_allocated_gib": per_rank(acc.max_memory_allocated() / GIB),
        "peak_reserved_gib": per_rank(acc.max_memory_reserved() / GIB),
        "host_peak_rss_gib": per_rank(host_peak_gib()),
    }


def random_batches(vocab: int, micro_batch: int, seq: int, count: int, seed: int) -> list[dict[str, Tensor]]:
    """`count` distinct micro-batches of random ids on the engine's device (labels = inputs, no padding)."""
    device = torch.device(get_accelerator().current_device_name())
    gen = torch.Generator().manual_seed(seed + 1000 * dist.get_rank())
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (micro_batch, seq), generator=gen)
        out.append(
            {"input_ids": ids.to(device), "labels": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        )
    return out


def calibration_share(vocab: int, samples: int, seq: int, seed: int) -> Tensor:
    """This rank's share of `samples` random calibration sequences (rank r takes rows r, r + world, ...)."""
    ids = torch.randint(0, vocab, (samples, seq), generator=torch.Generator().manual_seed(seed))
    return ids[dist.get_rank() :: dist.get_world_size()]


def set_gradient_checkpointing(engine: deepspeed.DeepSpeedEngine, enabled: bool) -> None:
    hf = unwrap(engine.module)
    if enabled:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_disable()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of fn(), synchronised before and after; seconds is the maximum over ranks."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return max_over_ranks([time.perf_counter() - start])[0], result


def matmul_params(model: nn.Module) -> int:
    """N for the FLOPs convention: elements of the frozen base model's linear weights (every projection of
    every block and the LM head; not the embedding, which is a lookup; not LoRA)."""
    total = 0
    for name, module in unwrap(model).named_modules():
        if isinstance(module, nn.Linear) and "lora_" not in name:
            total += int(getattr(module.weight, "ds_numel", module.weight.numel()))
    return total


def peak_tflops(override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given with --peak-tflops"
    if not torch.cuda.is_available():
        return None, "no accelerator peak known (CPU run): MFU not computed"
    name = torch.cuda.get_device_name()
    for key, value in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return value, f"{name}: dense bf16 tensor-core peak {value} TFLOP/s (datasheet, no sparsity)"
    return None, f"{name}: peak unknown, pass --peak-tflops"


class BlockTimer:
    """Wall-clock per decoder block of a prune event: a forward pre-hook on every block marks (after a
    synchronize) the first call into block k; block k's time runs from there to the first call into block
    k + 1 (the last block's to the end of the event). It covers the statistics pass, scoring, PBS, the
    writes and the propagation pass of that block. Each mark also reads the accelerator's allocated memory
    and its peak so far, to show what grows from block to block."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = decoder_layers(model)
        self.marks: dict[int, float] = {}
        self.allocated: dict[int, tuple[float, float]] = {}
        self._handles: list[Any] = []

    def _hook(self, index: int) -> Callable:
        def mark(_module: nn.Module, _args: tuple, _kwargs: dict) -> None:
            if index not in self.marks:
                sync()
                self.marks[index] = time.perf_counter()
                acc = get_accelerator()
                self.allocated[index] = (acc.memory_allocated() / GIB, acc.max_memory_allocated() / GIB)

        return mark

    def __enter__(self) -> BlockTimer:
        self.marks.clear()
        self._handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        sync()
        self.end = time.perf_counter()
        for handle in self._handles:
            handle.remove()

    def seconds(self) -> list[float]:
        """Per block, the maximum over ranks (collective)."""
        ends = [self.marks.get(i + 1, self.end) for i in range(len(self.layers))]
        return max_over_ranks([ends[i] - self.marks.get(i, self.end) for i in range(len(self.layers))])

    def memory_gib(self) -> dict[str, list[float]]:
        """Per block, at its first call: allocated accelerator memory and the peak since the last reset, GiB
        (maximum over ranks; collective)."""
        now, peak = zip(*(self.allocated.get(i, (0.0, 0.0)) for i in range(len(self.layers))), strict=True)
        return {
            "allocated_at_block_start": max_over_ranks(list(now)),
            "peak_at_block_start": max_over_ranks(list(peak)),
        }


def profile_tables(fn: Callable[[], Any], rows: int = 15) -> dict[str, str]:
    """torch.profiler summary of one call: the top ops by self accelerator time (on CUDA) and self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        fn()
        sync()
    averages = prof.key_averages()
    tables = {"by_self_cpu_time": averages.table(sort_by="self_cpu_time_total", row_limit=rows)}
    if cuda:
        tables["by_self_cuda_time"] = averages.table(sort_by="self_cuda_time_total", row_limit=rows)
    return tables


def collective_counts(fn: Callable[[], Any]) -> dict[str, int]:
    """Calls of each torch.distributed collective while `fn` runs: torch.profiler's counts of the c10d ops, which
    every backend (NCCL, gloo) goes through."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("c10d::")}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "world_size": dist.get_world_size(),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "device_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "NCCL_PROTO", "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }


class Results:
    """One JSON document: {"meta": ..., "measurements": [...]}, rewritten atomically by rank 0 after each add."""

    def __init__(self, path: str, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.doc: dict[str, Any] = {"meta": meta, "measurements": []}
        self._write()

    def add(self, record: dict[str, Any]) -> None:
        self.doc["measurements"].append(record)
        self._write()
        if dist.get_rank() == 0:
            brief = {k: v for k, v in record.items() if not isinstance(v, (dict, list)) or k == "peak_allocated_gib"}
            print(f"[bench] {json.dumps(brief)}", flush=True)

    def _write(self) -> None:
        if dist.get_rank() != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        os.replace(tmp, self.path)
