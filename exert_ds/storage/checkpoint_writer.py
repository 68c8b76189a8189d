"""The background half of a checkpoint write: encode, torch.save, fsync and sha256 of this rank's files, then (rank 0,
once every rank's files are complete) the manifest, the atomic rename, `latest` and the pruning of old checkpoints.

One write at a time per process, on a thread, so that training goes on while the files are written; its ranks meet in
a collective of a separate gloo process group (made once, on the main thread), never in the training's group. A
failure is kept and raised, as one line on every rank, by the next `wait()` (the next save, or the end of training).
A process killed mid-write leaves only the hidden temporary folder: `latest` still names the previous checkpoint.

EXERT_DS_CHECKPOINT_WRITE_DELAY_S (seconds, fault injection for the kill tests) makes every background write start
that much later, so that a test can kill a run while one is in flight.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import deepspeed.comm as dist
import torch
import torch.distributed

from exert_ds.errors import ConfigError
from exert_ds.storage.atomic import fsync_path
from exert_ds.storage.manifest import sha256_file

DELAY_ENV = "EXERT_DS_CHECKPOINT_WRITE_DELAY_S"


class BackgroundWriter:
    """This process's in-flight checkpoint write (at most one)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._group = None

    def _side_group(self):
        if self._group is None:  # collective: every rank makes its first save at the same point
            self._group = torch.distributed.new_group(backend="gloo")
        return self._group

    def start(
        self,
        write_files: Callable[[], list[Path]],
        folder: Path,
        publish: Callable[[dict[str, str]], None],
        what: str,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        """Collective. On a thread: `write_files()` writes this rank's files and returns every file it owns under
        `folder` (DeepSpeed's included); each is fsynced and hashed; the ranks exchange their hashes; rank 0 calls
        `publish(hashes of every rank's files)` if no rank failed, else `cleanup()`. `what` names the checkpoint in
        errors; a ConfigError (e.g. atomic.WriteError: a refused write, naming the path) keeps its own line."""
        assert self._thread is None, "wait() for the previous write first"
        group, rank, world = self._side_group(), dist.get_rank(), dist.get_world_size()

        def run() -> None:
            hashes: dict[str, str] = {}
            error = None
            try:
                time.sleep(float(os.environ.get(DELAY_ENV, "0")))
                for path in write_files():
                    fsync_path(path)
                    hashes[str(path.relative_to(folder))] = sha256_file(path)
            except ConfigError as err:
                error = str(err)
            except Exception as err:  # noqa: BLE001 - any failure must reach every rank as one line
                error = f"writing checkpoint {what} failed on rank {rank}: {_one_line(err)}"
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, (hashes, error), group=group)
            failed = next((e for _, e in gathered if e), None)
            if rank == 0 and failed is None:
                try:
                    publish({k: v for part, _ in gathered for k, v in part.items()})
                except ConfigError as err:
                    failed = str(err)
                except Exception as err:  # noqa: BLE001
                    failed = f"publishing checkpoint {what} failed on rank 0: {_one_line(err)}"
            if rank == 0 and failed is not None and cleanup is not None:
                cleanup()  # every rank's writing is over: the partial folder goes
            self._error = failed

        self._thread = threading.Thread(target=run, name=f"checkpoint-writer {what}")
        self._thread.start()

    def wait(self) -> None:
        """Collective: wait for this process's write, then raise the first failure of any rank on every rank."""
        self.join()
        error, self._error = self._error, None
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        failed = next((e for e in errors if e), None)
        if failed:
            raise ConfigError(f"{failed}; the previous checkpoint (see `latest`) is intact")

    def join(self) -> None:
        """Local: wait for this process's write to end (no collective; a failure stays kept for `wait`)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    where = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    return f"{type(err).__name__}: {text}" + (
        f" (at {Path(where[0].filename).name}:{where[0].lineno})" if where else ""
    )


WRITER = BackgroundWriter()
