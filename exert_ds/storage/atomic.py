"""Atomic folder writes, file integrity and write errors, shared by checkpoints, experts, exports and results.

A folder is written under a temporary name beside its final one, every file fsynced, then renamed over the final
name in one `os.replace` and the parent fsynced: a reader sees the old folder or the whole new one, never a part.

A write the file system refuses (full disk, quota, permissions, read-only mount) becomes one `ConfigError` naming
the path and the OS error (`write_errors`); in a collective write every rank records its own (`SharedWrite`) and all
ranks raise the first one together, so no rank is left waiting in a collective for a peer that stopped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from exert_ds.errors import ConfigError

# what a user fixes by freeing space, raising a quota or choosing another folder (not a bug of ours)
USER_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG})


class WriteError(ConfigError):
    """A write the operating system refused; the message names the path and the OS error."""


def write_error(path: str | Path, err: OSError) -> WriteError:
    name = errno.errorcode.get(err.errno, str(err.errno))
    where = err.filename if err.filename else path
    return WriteError(
        f"cannot write {where}: {err.strerror or err} ({name}); free space, fix the permissions or choose another "
        "output folder, then run again"
    )


@contextlib.contextmanager
def write_errors(path: str | Path) -> Iterator[None]:
    """Turn an OSError of `USER_WRITE_ERRNOS` raised inside into a WriteError naming `path` (or the OS's own
    file name when it gives one)."""
    try:
        yield
    except OSError as err:
        if err.errno in USER_WRITE_ERRNOS:
            raise write_error(path, err) from err
        raise


def torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through a Python file object: a refused write surfaces as the WriteError it is, not as torch's
    `[enforce fail at inline_container.cc] unexpected pos` RuntimeError (which keeps the OSError as its context)."""
    with write_errors(path):
        try:
            with open(path, "wb") as fh:
                torch.save(obj, fh)
        except RuntimeError as err:
            if isinstance(err.__context__, OSError):
                raise err.__context__ from err
            raise


class SharedWrite:
    """A write every rank of a collective does: `catch()` records this rank's first WriteError instead of raising
    it, so the rank still joins the collectives that follow; `share()` (collective) raises the first recorded error
    on every rank, as in trainer.finish. `cleanup` runs on the ranks where it is given, before the raise."""

    def __init__(self, cleanup: Callable[[], None] | None = None) -> None:
        self.error: WriteError | None = None
        self.cleanup = cleanup

    @contextlib.contextmanager
    def catch(self) -> Iterator[None]:
        try:
            yield
        except WriteError as err:
            self.error = self.error or err

    def share(self) -> None:
        """Collective when a process group is up: raise the first rank's error (in rank order) on every rank."""
        import deepspeed.comm as dist

        mine = None if self.error is None else str(self.error)
        messages = [mine]
        if dist.is_initialized():
            messages = [None] * dist.get_world_size()
            dist.all_gather_object(messages, mine)
        first = next((m for m in messages if m), None)
        if first is None:
            return
        if self.cleanup is not None:
            self.cleanup()
        raise WriteError(first) from self.error


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename inside it durable)."""
    with write_errors(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_sibling(final: Path) -> Path:
    """The temporary folder a write of `final` goes to: `.<name>.tmp` beside it."""
    return final.parent / f".{final.name}.tmp"


def publish(tmp: Path, final: Path) -> Path:
    """fsync every file under `tmp`, then replace `final` by it atomically and fsync the parent."""
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_path(path)
    fsync_path(tmp)
    with write_errors(final):
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    fsync_path(final.parent)
    return final
