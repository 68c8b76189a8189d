"""2-rank worker: perplexity of the tiny LoRA model inside a ZeRO-3 engine over 5 windows, so the ranks' shares
differ (3 and 2) and the smaller one is padded to as many forward calls; rank 0 saves the result per micro-batch."""

import argparse
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch

from exert_ds.perplexity import perplexity
from exert_ds.zero3 import Zero3Backend
from tests.tiny_models import calibration_ids, tiny_lora_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = tiny_lora_model("llama-odd")
config = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
}
engine, *_ = deepspeed.initialize(
    model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
)
engine.module.train()
windows = calibration_ids(n=5, length=16)
results = {
    micro: perplexity(engine.module, windows, micro, rank, world, reduce=Zero3Backend().all_reduce) for micro in (1, 2)
}
assert engine.module.training, "perplexity must restore the train mode"
if rank == 0:
    torch.save(results, Path(args.out))
