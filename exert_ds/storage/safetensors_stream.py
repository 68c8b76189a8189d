"""Write a safetensors file one tensor at a time, so that no writer ever holds more than one tensor.

safetensors' own `save_file` needs every tensor in memory at once. Its format is simple and documented
(an 8-byte little-endian header length, a JSON header of name → dtype, shape, byte offsets, then the raw
bytes in order), so when the names, dtypes and shapes are known up front the header is written first and
the bytes follow as each tensor arrives. The files are read back with the stock `safetensors` reader.

Kept by hand because no library call does this: safetensors 0.8 writes only from a complete dict of tensors
(`save_file`, `serialize_file`), and huggingface_hub's shard planner, used by export.py, only decides which
tensors go in which file. A ZeRO-3 rank streaming its partitions of a 70B model cannot hold them all at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * torch.empty((), dtype=dtype).element_size()


class SafetensorsStream:
    """A safetensors file whose tensors (`specs`: name, dtype, shape, in file order) are written in order.

    With `digest=True` the sha256 of the whole file is computed on the way (`close()` returns it)."""

    def __init__(
        self,
        path: str | Path,
        specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        metadata: dict[str, str] | None = None,
        digest: bool = False,
    ) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in specs:
            size = nbytes(dtype, shape)
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": [int(s) for s in shape],
                "data_offsets": [offset, offset + size],
            }
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.path = Path(path)
        self._pending = [(name, dtype, tuple(int(s) for s in shape)) for name, dtype, shape in specs]
        self._hash = hashlib.sha256() if digest else None
        self._fh = self.path.open("wb")
        self._emit(struct.pack("<Q", len(text)) + text)

    def _emit(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        if self._hash is not None:
            self._hash.update(data)

    def write(self, name: str, tensor: Tensor) -> None:
        """Append the next tensor; its name, dtype and shape must be the next ones of `specs`."""
        if not self._pending:
            raise ValueError(f"{self.path}: {name} is one tensor more than the header declares")
        want = self._pending.pop(0)
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != want:
            raise ValueError(f"{self.path}: got {got}, the header declares {want} next")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._emit(memoryview(flat.view(torch.uint8).numpy()))

    def close(self) -> str | None:
        """Flush and fsync; the file's sha256 when `digest` was asked for."""
        if self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} declared tensors were never written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self._hash.hexdigest() if self._hash is not None else None
