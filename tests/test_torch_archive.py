"""storage/torch_archive.py reads what torch.save wrote, without torch, as torch.load does."""

from __future__ import annotations

import pickle
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch

from exert_ds.storage import torch_archive


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    return (tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def same(got, want, path: str = "") -> int:
    """Compare a torch_archive object with torch.load's; returns how many tensors were compared."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch_archive.StoredTensor), path
        assert got.shape == tuple(want.shape) and got.numel == want.numel(), path
        assert np.array_equal(got.numpy(), as_numpy(want)), path
        return 1
    if isinstance(want, dict):
        assert type(got) is type(want) and list(got) == list(want), path
        return sum(same(got[k], want[k], f"{path}.{k}") for k in want)
    if isinstance(want, (list, tuple)):
        kind = tuple if isinstance(want, torch.Size) else type(want)  # torch.Size is read as a tuple
        assert type(got) is kind and len(got) == len(want), path
        return sum(same(g, w, f"{path}[{i}]") for i, (g, w) in enumerate(zip(got, want, strict=True)))
    if isinstance(want, torch.dtype):
        assert got == str(want), path
        return 0
    if isinstance(want, np.ndarray):
        assert np.array_equal(got, want), path
        return 0
    assert got == want, path
    return 0


def test_reads_what_torch_load_reads(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {
        "mask": torch.tensor([0b10110001, 255, 0], dtype=torch.uint8),
        "weights": OrderedDict(w=torch.randn(3, 5, dtype=torch.bfloat16), i=torch.arange(7, dtype=torch.int64)),
        "transposed": base.t(),  # non-contiguous: strides into a shared storage
        "slice": base[1:3, 2:],  # an offset into the same storage
        "half": torch.randn(4, dtype=torch.float16),
        "flags": torch.tensor([True, False, True]),
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "plain": [1, 2.5, "x", None, (3, 4), b"bytes", {7, 8}],
        "scalar": torch.tensor(3.5, requires_grad=True),
    }
    torch.save(obj, tmp_path / "f.pt")
    got = torch_archive.load(tmp_path / "f.pt")
    assert same(got, torch.load(tmp_path / "f.pt", weights_only=False)) == 9


def test_refuses_objects_it_cannot_build_without_torch(tmp_path):
    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    with pytest.raises(pickle.UnpicklingError, match="is not read without torch"):
        torch_archive.load(tmp_path / "module.pt")


def test_inspect_falls_back_to_torch_load_for_a_file_it_cannot_read(tmp_path):
    """A per-rank file holding something torch_archive refuses still gives its bitmask counts, through torch.load."""
    from exert_ds.storage.inspection import stored_masks

    mask = torch.tensor([0b00001111, 0b10000000], dtype=torch.uint8)
    torch.save({"weights": {"w": {"numel": 16, "mask": mask}}, "other": torch.nn.Linear(1, 1)}, tmp_path / "r.pt")
    ((name, (numel, got)),) = stored_masks(tmp_path / "r.pt").items()
    assert name == "w" and numel == 16 and np.array_equal(got, mask.numpy())
