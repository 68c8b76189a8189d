"""exert_ds.cli's process hygiene: DeepSpeed's shared-memory buffer is removed on every exit path; only rank 0
speaks."""

import os
from pathlib import Path

import pytest

from exert_ds.runtime.dist import remove_deepspeed_shm_buffer
from tests.fixtures import run_yaml
from tests.launch import REPO, deepspeed_cpu, free_port


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_removes_only_this_ranks_deepspeed_shm_buffer(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # a port no real job of this test run uses
    prefix = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_"
    mine, peer = Path(prefix + "0"), Path(prefix + "1")
    mine.write_bytes(b"x")
    peer.write_bytes(b"x")
    try:
        remove_deepspeed_shm_buffer(0)
        assert not mine.exists() and peer.exists()
        remove_deepspeed_shm_buffer(0)  # already gone: no error
    finally:
        mine.unlink(missing_ok=True)
        peer.unlink(missing_ok=True)


QUIET_PROBE = """
import sys, warnings
from exert_ds.runtime.dist import quiet_other_ranks
quiet_other_ranks(int(sys.argv[1]))
import datasets
from tqdm.auto import tqdm
from transformers.utils import logging
datasets.Dataset.from_dict({"a": list(range(3))}).map(lambda b: b, batched=True, desc="tokenizing")
for _ in tqdm(range(3), desc="some bar"):
    pass
warnings.warn("a library warning")
logging.get_logger("transformers").warning("a transformers warning")
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_zero_prints_bars_and_warnings(rank):
    """quiet_other_ranks, called before the libraries are imported (as the CLI does): on rank 1 no dataset or tqdm
    bar, no Python warning and no transformers warning; rank 0 prints all of them."""
    import subprocess
    import sys

    err = subprocess.run(
        [sys.executable, "-c", QUIET_PROBE, str(rank)], capture_output=True, text=True, check=True
    ).stderr
    printed = [text in err for text in ("tokenizing", "some bar", "a library warning", "a transformers warning")]
    assert printed == [rank == 0] * 4, err


def test_deepspeed_speaks_info_only_when_verbose():
    from deepspeed.utils import logger

    from exert_ds.runtime.dist import set_verbosity

    levels = []
    for verbose, rank in ((False, 0), (True, 0), (False, 1)):
        set_verbosity(verbose, rank)
        levels.append((logger.level, logger.handlers[0].level))
    set_verbosity(False, 0)
    assert levels == [(30, 30), (20, 20), (40, 40)]  # WARNING, INFO, ERROR


def shm_buffers(port: int) -> list[Path]:
    """DeepSpeed's shared-memory all-reduce buffers of the job on MASTER_PORT `port`, one per rank."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


@pytest.mark.distributed
@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_a_run_that_fails_after_the_process_group_started_leaves_no_shm_buffer(tmp_path):
    """A one-line error found after the process group started (the launcher may end the slower rank before it
    prints its line) leaves no buffer. Before the fix only a successful run removed them."""
    config = run_yaml(tmp_path, calibration={"num_samples": 400, "seq_len": 16})
    port = free_port()
    proc = deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config)], 2, 300, port, check=False)
    assert proc.returncode != 0 and "exert-ds: error: calibration: calibration needs 400" in proc.stderr
    assert shm_buffers(port) == []


@pytest.mark.distributed
@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
@pytest.mark.parametrize("how", ["exception", "sigterm"])
def test_a_crashed_or_terminated_run_leaves_no_shm_buffer(how):
    """Rank 1 crashes (an exception) or is ended by SIGTERM after the process group started; the launcher then
    ends rank 0 with SIGTERM. Neither rank's buffer is left."""
    port = free_port()
    worker = str(REPO / "tests" / "workers" / "fail_after_init.py")
    proc = deepspeed_cpu([worker, "--how", how], 2, 300, port, check=False)
    assert proc.returncode != 0
    assert shm_buffers(port) == []
