"""Test-wide hygiene: a CPU rank killed while DeepSpeed's shared-memory all-reduce starts (before
exert_ds.runtime.dist.init_distributed unlinks its 69 MB /dev/shm buffer) leaves the buffer behind; the suite starts
~100 launches, so remove the buffers a test created that no live process maps once it is over. Buffers still mapped
belong to runs that go on (another test session's on the same machine, say): removing those would leave a peer
that has yet to open them waiting for ever."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

SHM = Path("/dev/shm")


def _buffers() -> set[Path]:
    return set(SHM.glob("deepspeed_allreduce_buffer_*")) if SHM.is_dir() else set()


def _mapped() -> set[str]:
    """Paths under /dev/shm that some live process maps (those this user may read the maps of)."""
    paths = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process is gone, or not ours to read
            continue
        paths.update(line.split(None, 5)[-1] for line in text.splitlines() if "/dev/shm/" in line)
    return paths


@pytest.fixture(autouse=True)
def remove_leftover_shm_buffers() -> Iterator[None]:
    before = _buffers()
    yield
    left = _buffers() - before
    if left:
        mapped = _mapped()
        for path in left:
            if str(path) not in mapped:
                path.unlink(missing_ok=True)
