"""Read the tensors of a `torch.save` file as numpy arrays, without importing torch.

Why not `torch.load`: `import torch` alone costs about 1.3 s of CPU (torch 2.13 on this project's CPU machine), more
than the whole budget of `exert-ds inspect` (README, "CLI speed"), which only needs the packed bitmasks of a
checkpoint's per-rank files to count zeros. The format read here is torch's zip serialization, the default of
`torch.save` since torch 1.6 (torch/serialization.py, `_save` and `_load`): a zip archive whose `<prefix>/data.pkl`
is a pickle in which each tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and each
storage a persistent id `('storage', <torch dtype>Storage, key, location, numel)` whose bytes are the stored
(uncompressed) entry `<prefix>/data/<key>`, in the byte order named by `<prefix>/byteorder`. Only what the pickle
names is rebuilt: tensors (as lazy `StoredTensor`s that read their storage on `.numpy()`), torch dtypes (as their
names), `torch.Size`, and plain Python, numpy and collections objects; anything else is refused.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# torch's typed storage classes → numpy dtype of their elements (bfloat16 has no numpy type: its raw 16 bits)
STORAGE_DTYPES = {
    "ByteStorage": np.uint8,
    "CharStorage": np.int8,
    "ShortStorage": np.int16,
    "IntStorage": np.int32,
    "LongStorage": np.int64,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "BoolStorage": np.bool_,
}
SAFE_GLOBALS = {  # what else torch.save's pickle names in our files: containers, numpy arrays (RNG states), bytes
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "slice"),
}


class _Storage:
    """One stored entry of the archive, read when a tensor over it is first materialised."""

    def __init__(self, archive: zipfile.ZipFile, record: str, dtype: type, little_endian: bool) -> None:
        self.archive, self.record = archive, record
        self.dtype = np.dtype(dtype).newbyteorder("<" if little_endian else ">")
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.frombuffer(self.archive.read(self.record), dtype=self.dtype)
        return self._array


@dataclass
class StoredTensor:
    """A tensor of the archive: its storage, element offset, shape and strides (in elements)."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def numpy(self) -> np.ndarray:
        """The values (a read-only view of the storage; bfloat16 as its raw uint16 bits)."""
        base = self.storage.array()[self.offset :]
        strides = tuple(s * base.itemsize for s in self.stride)
        return np.lib.stride_tricks.as_strided(base, self.shape, strides, writeable=False)


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> StoredTensor:
    return StoredTensor(storage, int(offset), tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, little_endian: bool) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.little_endian = archive, prefix, little_endian
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch", "Size"):
            return tuple
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        if module == "torch" and name[:1].islower():  # a dtype object, e.g. torch.bfloat16: kept as its name
            return f"torch.{name}"
        if (module.replace("__builtin__", "builtins"), name) in SAFE_GLOBALS:  # protocol 2 names Python 2's module
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not read without torch")

    def persistent_load(self, pid: tuple) -> _Storage:
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or storage_type not in STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r} {storage_type!r}")
        if key not in self.storages:
            record = f"{self.prefix}data/{key}"
            self.storages[key] = _Storage(self.archive, record, STORAGE_DTYPES[storage_type], self.little_endian)
        return self.storages[key]


def load(path: str | Path) -> Any:
    """The object a `torch.save(obj, path)` wrote, with every tensor a `StoredTensor` (read on `.numpy()`).
    Raises `pickle.UnpicklingError` for a file it cannot read without torch and `zipfile.BadZipFile` for one that
    is not a zip archive (a legacy, pre-1.6 torch file, or a damaged one). The archive stays open while the
    returned tensors are read."""
    archive = zipfile.ZipFile(path)
    pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
    if len(pickles) != 1:
        raise pickle.UnpicklingError(f"{path}: expected one data.pkl, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    little = archive.read(byteorder).decode() == "little" if byteorder in archive.namelist() else True
    return _Unpickler(archive.read(pickles[0]), archive, prefix, little).load()
