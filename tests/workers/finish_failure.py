"""2-rank worker: `trainer.train` whose export into output_dir/final fails on rank 0 (the path is a file); every
rank writes the error it got to error-rank{R}.txt in --out, so the test sees what each rank raised."""

import argparse
from pathlib import Path

import deepspeed.comm as dist

from exert_ds.config import load_config
from exert_ds.errors import ConfigError
from exert_ds.runtime.dist import finish_launched_rank
from exert_ds.train import trainer

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

try:
    trainer.train(load_config(args.config))
    message = "no error"
except ConfigError as err:
    message = f"ConfigError: {err}"
Path(args.out, f"error-rank{dist.get_rank()}.txt").write_text(message)
finish_launched_rank()  # leave the group together, then skip the teardown that can abort a rank
