"""exert_ds.cli's process hygiene: the shared-memory buffer DeepSpeed's CPU all-reduce leaves is removed."""

import os
from pathlib import Path

import pytest

from exert_ds.runtime.dist import remove_deepspeed_shm_buffer


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
