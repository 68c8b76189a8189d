"""Test-wide hygiene: CPU ranks that a test kills (or that exit without exert_ds's shutdown) leave DeepSpeed's
69 MB shared-memory all-reduce buffers in /dev/shm (see exert_ds.runtime.dist.remove_deepspeed_shm_buffer); the suite
starts ~100 launches, so remove the buffers each test created once it is over."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

SHM = Path("/dev/shm")


def _buffers() -> set[Path]:
    return set(SHM.glob("deepspeed_allreduce_buffer_*")) if SHM.is_dir() else set()


@pytest.fixture(autouse=True)
def remove_leftover_shm_buffers() -> Iterator[None]:
    before = _buffers()
    yield
    for path in _buffers() - before:
        path.unlink(missing_ok=True)
