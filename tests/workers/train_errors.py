"""2-rank worker: `trainer.train` (optionally resumed); every rank writes the error it got (or "no error") to
error-rank{R}.txt in --out, so a test sees what each rank raised, also when the error comes before the process
group starts."""

import argparse
import os
from pathlib import Path

import deepspeed.comm as dist

from exert_ds.config import load_config
from exert_ds.errors import ConfigError
from exert_ds.runtime.dist import finish_launched_rank
from exert_ds.train import trainer

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--resume", default=None)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

try:
    trainer.train(load_config(args.config), resume=args.resume)
    message = "no error"
except ConfigError as err:
    message = f"ConfigError: {' '.join(str(err).split())}"
rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
Path(args.out, f"error-rank{rank}.txt").write_text(message)
finish_launched_rank()  # leave the group together, then skip the teardown that can abort a rank
