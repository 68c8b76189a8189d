"""Worker: LoRA steps, a prune event and one more step in the trainer's ZeRO-3 engine, with or without
`stage3_module_granularity_threshold` (issue 19's lever: each decoder block fetched as one ZeRO-3 leaf). Rank 0
writes the losses, the leaf modules, the event's sparsity and the gathered weights after the event.

DeepSpeed's CPU accelerator cannot `record_stream` a CPU tensor, which ZeRO-3's `zero_grad` calls for the gradients
that leaf modules leave behind; on CPU ranks only, that call is made a no-op here (on CUDA it is what DeepSpeed does).
"""

import argparse
import json
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.utils import z3_leaf_module

from exert_ds.config import CalibrationConfig, ModelConfig, PBSConfig, PruneConfig, RunConfig, TrainConfig
from exert_ds.prune.event import run_prune_event
from exert_ds.runtime.dist import finish_launched_rank, init_distributed
from exert_ds.runtime.zero3 import Zero3Backend
from exert_ds.train.trainer import build_engine, train_micro_step

torch.Tensor.record_stream = lambda self, stream: None  # CPU tensors have no stream (see the docstring)

parser = argparse.ArgumentParser()
parser.add_argument("--config-dir", required=True)
parser.add_argument("--threshold", type=int, default=0)
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
cfg = RunConfig(
    model=ModelConfig(name_or_path=args.config_dir, init="random", dtype="float32", attn_implementation="sdpa"),
    lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
    calibration=CalibrationConfig(num_samples=4, seq_len=32, micro_batch=1),
    prune=PruneConfig(sparsity=0.5),
    pbs=PBSConfig(mode="hessian"),
    train=TrainConfig(gradient_checkpointing=True, seed=0),
)
zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
if args.threshold:
    zero["stage3_module_granularity_threshold"] = args.threshold
ds = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": zero,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
}
torch.manual_seed(0)
engine = build_engine(cfg, ds)
gen = torch.Generator().manual_seed(1 + rank)
losses = []


def step() -> None:
    ids = torch.randint(0, 512, (2, 32), generator=gen)
    losses.append(float(train_micro_step(engine, {"input_ids": ids, "labels": ids})))


for _ in range(3):
    step()
calibration = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(7))
report, _ = run_prune_event(engine.module, Zero3Backend(), cfg, calibration[rank::world], pbs=True)
step()
weights = {}
for name, param in engine.module.named_parameters():
    with deepspeed.zero.GatheredParameters([param]):
        weights[name] = param.detach().clone()
if rank == 0:
    leaves = [name for name, module in engine.module.named_modules() if z3_leaf_module(module)]
    Path(args.out).write_text(json.dumps({"losses": losses, "leaves": leaves, "scalars": report.scalars()}))
    torch.save(weights, Path(args.out).with_suffix(".pt"))
finish_launched_rank()  # leave the group together, then skip the teardown that can abort a rank
