"""Worker: load a saved PEFT adapter into LoRA that ZeRO-3 has already partitioned (trainer.load_adapter_weights),
then gather every LoRA parameter; rank 0 saves them by name. With an adapter that does not fit, every rank writes
the one-line error it got."""

import argparse
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch

from exert_ds.errors import ConfigError
from exert_ds.runtime.dist import finish_launched_rank
from exert_ds.train.trainer import load_adapter_weights
from tests.tiny_models import tiny_lora_model

parser = argparse.ArgumentParser()
parser.add_argument("--adapter", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
model = tiny_lora_model("llama-odd", r=4, seed=0)
config = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
}
trainable = [p for p in model.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
lora = {name: p for name, p in engine.module.named_parameters() if "lora_" in name}
assert lora and all(hasattr(p, "ds_id") and p.numel() == 0 for p in lora.values())  # partitioned before the load
try:
    load_adapter_weights(engine.module, args.adapter)
except ConfigError as err:
    Path(args.out).with_suffix(f".rank{rank}.txt").write_text(str(err))
else:
    with deepspeed.zero.GatheredParameters(list(lora.values())):
        gathered = {name: p.detach().clone() for name, p in lora.items()}
    if rank == 0:
        torch.save(gathered, args.out)
finish_launched_rank()  # leave the group together, then skip the teardown that can abort a rank
