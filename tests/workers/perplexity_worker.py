"""2-rank worker: perplexity of the tiny LoRA model inside a ZeRO-3 engine over 5 windows, so the ranks' shares
differ (3 and 2) and the smaller one is padded to as many forward calls; rank 0 saves the result per micro-batch.
Then the trainer's held_out_perplexity: the same value, and it leaves no parameter gathered (a bare no-grad
forward does: on an H200 the 7B model's next training step peaked 1.5 GiB higher)."""

import argparse
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import deepspeed.comm as dist
import torch

from exert_ds.evaluation.perplexity import perplexity
from exert_ds.runtime.dist import finish_launched_rank
from exert_ds.runtime.zero3 import Zero3Backend
from exert_ds.train.trainer import held_out_perplexity
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


def release_check() -> None:
    """On an engine whose first call was a training step (ZeRO-3 then keeps parameters gathered after a no-grad
    forward), held_out_perplexity equals a bare perplexity and leaves no parameter gathered."""
    model = tiny_lora_model("llama-odd")
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    ids = calibration_ids(n=2, seed=3)[rank : rank + 1]
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()

    def gathered() -> int:
        return sum(p.ds_status.name != "NOT_AVAILABLE" for p in engine.module.parameters())

    bare = perplexity(engine.module, windows, 2, rank, world, reduce=Zero3Backend().all_reduce)
    assert gathered() > 0, "a bare no-grad forward under ZeRO-3 was expected to leave parameters gathered"
    engine.empty_partition_cache()
    session = SimpleNamespace(
        engine=engine, perplexity_windows=windows, cfg=SimpleNamespace(eval=SimpleNamespace(micro_batch=2))
    )
    held_out = held_out_perplexity(session)
    assert held_out == bare["perplexity"], (held_out, bare)
    assert gathered() == 0, f"held_out_perplexity left {gathered()} parameters gathered"


release_check()
if rank == 0:
    torch.save(results, Path(args.out))
finish_launched_rank()  # leave the group together, then skip the teardown that can abort a rank
