"""Worker for the checkpoint schema test: the trainer's engine over a tiny model, and one extra per-rank field
`dummy` (per pruned base weight, this rank's flat elements hold their own global flat index, float64) added the one
way a field is added: a RankField beside checkpoint_fields.FIELDS.

--mode save: save a checkpoint with the dummy field; then a save whose background write fails on rank 1 (a folder
stands where its file goes); the next save must raise that failure on every rank. Each rank writes error-rank{R}.txt.
--mode load: resume the checkpoint (at whatever world size this runs) and write the dummy fragment every rank got
to dummy-rank{R}.pt, with its flat range.
"""

import argparse
from dataclasses import replace
from pathlib import Path

import deepspeed.comm as dist
import torch

from exert_ds.config import ModelConfig, RunConfig
from exert_ds.errors import ConfigError
from exert_ds.runtime.dist import finish_launched_rank, init_distributed, launched_world_size
from exert_ds.runtime.ds_config import load_ds_config
from exert_ds.runtime.zero3 import local_range
from exert_ds.storage import checkpoint as ckpt
from exert_ds.storage.checkpoint_fields import FIELDS, pruned_base_weights
from exert_ds.storage.checkpoint_schema import PARAMS, RankField
from exert_ds.train import trainer

parser = argparse.ArgumentParser()
parser.add_argument("--mode", choices=("save", "load"), required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--ds-config", required=True)
parser.add_argument("--root", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

restored: dict[str, torch.Tensor] = {}


def save_dummy(state) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in pruned_base_weights(state.engine.module).items():
        rng = local_range(param)
        out[name] = torch.arange(rng.start, rng.end, dtype=torch.float64)
    return out


DUMMY = RankField(
    "dummy",
    PARAMS,
    names=lambda model: {n: n for n in pruned_base_weights(model)},
    save=save_dummy,
    restore=lambda state, values: restored.update(values),
)
WITH_DUMMY = (*FIELDS, DUMMY)

ds_config = load_ds_config(args.ds_config, launched_world_size())
init_distributed()
rank = dist.get_rank()
cfg = RunConfig(
    model=ModelConfig(name_or_path=args.model, dtype="float32", attn_implementation="eager"),
    lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
    deepspeed=args.ds_config,
)
engine = trainer.build_engine(cfg, ds_config)
root, out = Path(args.root), Path(args.out)
if args.mode == "save":
    position = ckpt.TrainPosition(step=1)
    ckpt.save_checkpoint(engine, {}, position, root, "fingerprint", keep=5, fields=WITH_DUMMY)
    ckpt.wait_for_checkpoint()
    second = ckpt.save_checkpoint(engine, {}, replace(position, step=2), root, "fingerprint", 5, WITH_DUMMY)
    if rank == 1:  # the background write (delayed by the test's environment) finds a folder where its file goes
        (second.parent / f".{second.name}.tmp" / "base-rank00001.pt").mkdir()
    try:
        ckpt.save_checkpoint(engine, {}, replace(position, step=3), root, "fingerprint", 5, WITH_DUMMY)
        ckpt.wait_for_checkpoint()
        message = "no error"
    except ConfigError as err:
        message = str(err)
    (out / f"error-rank{rank}.txt").write_text(message)
else:
    ckpt.load_checkpoint(engine, root / (root / "latest").read_text(), "fingerprint", fields=WITH_DUMMY)
    ranges = {n: [local_range(p).start, local_range(p).end] for n, p in pruned_base_weights(engine.module).items()}
    torch.save({"restored": restored, "ranges": ranges}, out / f"dummy-rank{rank}.pt")
finish_launched_rank()  # leave the group together, then skip the teardown that can abort a rank
