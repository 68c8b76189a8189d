"""2-rank worker that fails once the process group has started: rank 1 raises (`--how exception`) or is ended by
SIGTERM (`--how sigterm`); rank 0 waits until the launcher, seeing rank 1 gone, ends it with SIGTERM."""

import argparse
import os
import signal
import time

import deepspeed.comm as dist

from exert_ds.runtime.dist import init_distributed

parser = argparse.ArgumentParser()
parser.add_argument("--how", choices=("exception", "sigterm"), required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

init_distributed()
if dist.get_rank() == 1:
    if args.how == "exception":
        raise RuntimeError("a crash after the process group started")
    os.kill(os.getpid(), signal.SIGTERM)
time.sleep(300)
