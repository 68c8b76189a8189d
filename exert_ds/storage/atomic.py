"""Atomic folder writes and file integrity, shared by checkpoints, experts and exports.

A folder is written under a temporary name beside its final one, every file fsynced, then renamed over the final
name in one `os.replace` and the parent fsynced: a reader sees the old folder or the whole new one, never a part."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename inside it durable)."""
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
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(final.parent)
    return final
