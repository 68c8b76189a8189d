"""How the prune event reaches weights, adapters, optimizer state and the other ranks.

The event (event.py) is written once against `Backend`/`LinearAccess`: it works on a *row block* — the
rows of a weight that this process touches, zero outside the elements it holds. `DenseBackend` is the
single-process case (the row block is the whole matrix); `zero3.Zero3Backend` serves DeepSpeed ZeRO-3
partitions with the same interface, so both paths run the same tensor math.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol, get_args

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from exert_ds.config import ResetPolicy
from exert_ds.model.lora import lora_parts


class LinearAccess(Protocol):
    """One LoRA linear as seen by one process."""

    row_start: int  # first row of the block in the full matrix
    shape: tuple[int, int]  # (out, in) of the full matrix

    def valid(self) -> Tensor | None:
        """Bool row block, True where this process holds the element (None: all of it)."""

    def weight_block(self) -> Tensor:
        """W on the row block (at least float32), zero where not held."""

    def complete_rows(self, block: Tensor) -> Tensor:
        """`block` with each partial (boundary) row replaced by the sum over processes of their versions of that row:
        fragments zero where not held give the whole row; the whole row on its owner and zeros elsewhere give every
        process the owner's row."""

    def owned(self) -> Tensor | None:
        """Bool per block row: rows whose first element this process holds (None: all)."""

    def write_weight_block(self, block: Tensor) -> None:
        """Write the held elements of `block` into the base weight, every copy of it."""

    def adapter(self) -> tuple[Tensor, Tensor, float]:
        """(A, B, s) at least float32, whole (gathered), identical on every process."""

    def write_adapter(self, a: Tensor, b: Tensor, reset_policy: ResetPolicy) -> None:
        """Set A and B in every copy and apply the optimizer-state policy to their Adam moments."""


class Backend(Protocol):
    rank: int
    world: int

    def linear(self, layer: LoraLayer) -> LinearAccess: ...

    def whole_block(self, block: nn.Module) -> AbstractContextManager[None]:
        """Keep `block`'s parameters whole across the several forward calls of one pass over it."""

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum over processes, in place; returns the tensor."""


def reset_adam_moments(state: dict, policy: ResetPolicy) -> None:
    """Apply `train.reset_after_prune` to one parameter's Adam state (algorithm.md §5): none keeps both moments,
    zero zeroes both, keep_v zeroes the first. Raises ValueError for another policy."""
    if policy not in get_args(ResetPolicy):
        raise ValueError(f"config key 'train.reset_after_prune' must be one of {get_args(ResetPolicy)}, got {policy!r}")
    if policy == "none" or not state:
        return
    state["exp_avg"].zero_()
    if policy == "zero":
        state["exp_avg_sq"].zero_()


def work_precision(t: Tensor) -> Tensor:
    """float32, or float64 when the tensor is float64 (tests run whole events in float64)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


class DenseLinear:
    """A LoRA linear held whole by one process."""

    def __init__(self, layer: LoraLayer, optimizer: torch.optim.Optimizer | None) -> None:
        self._w, self._a, self._b, self._scale = lora_parts(layer)
        self._optimizer = optimizer
        self.row_start = 0
        self.shape = tuple(self._w.shape)

    def valid(self) -> Tensor | None:
        return None

    def owned(self) -> Tensor | None:
        return None

    def weight_block(self) -> Tensor:
        return work_precision(self._w)

    def complete_rows(self, block: Tensor) -> Tensor:
        return block

    @torch.no_grad()
    def write_weight_block(self, block: Tensor) -> None:
        self._w.copy_(block.to(self._w.dtype))

    def adapter(self) -> tuple[Tensor, Tensor, float]:
        return work_precision(self._a), work_precision(self._b), self._scale

    @torch.no_grad()
    def write_adapter(self, a: Tensor, b: Tensor, reset_policy: ResetPolicy) -> None:
        self._a.copy_(a.to(self._a.dtype))
        self._b.copy_(b.to(self._b.dtype))
        if self._optimizer is not None:
            for param in (self._a, self._b):
                reset_adam_moments(self._optimizer.state.get(param, {}), reset_policy)


class DenseBackend:
    """Single process: nothing to reduce, every row is ours."""

    rank = 0
    world = 1

    def __init__(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._optimizer = optimizer

    def linear(self, layer: LoraLayer) -> DenseLinear:
        return DenseLinear(layer, self._optimizer)

    def whole_block(self, block: nn.Module) -> AbstractContextManager[None]:
        return nullcontext()

    def all_reduce(self, tensor: Tensor) -> Tensor:
        return tensor
