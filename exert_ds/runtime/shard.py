"""ZeRO-3 partition geometry: the one place that knows which flat elements and rows a rank holds.

DeepSpeed ZeRO-3 flattens every parameter and cuts it into `world` equal partitions of
`P = ceil(numel / world)` elements; rank r keeps flat elements `[r·P, min((r+1)·P, numel))` in
`param.ds_tensor`, a buffer of exactly P elements whose tail on the last rank(s) is uninitialised
padding (a rank may hold no valid element at all when numel is small next to world). DeepSpeed 0.19.8
pads only up to a multiple of the partition world size, nothing coarser:
`runtime/zero/partition_parameters.py` `Init._padding_size` (line 1693) and `Init._partition_param`
(lines 1816-1817: `partition_size = _aligned_size(param) // world`).

Pruning works on rows of an `out × in` weight, which do not line up with those cuts: a rank's flat range
touches rows `floor(start/in) .. ceil(end/in) - 1`, and the first and last of them may be partial
("boundary rows"). Everything else in the package reasons through `ShardRange` and the helpers below so
that this arithmetic is written once. `world` here is the size of the parameter's partition group
(`param.ds_process_group`), which is the data-parallel world unless MiCS shards over a smaller group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ShardRange:
    """The flat slice `[start, end)` of one parameter held by `rank`, and the rows it touches.

    Frozen so that a range computed once can be shared between scoring, masking and merging code
    without anyone nudging it out of agreement with DeepSpeed's layout.
    """

    rank: int
    world: int
    numel: int
    partition_size: int  # P = ceil(numel / world): the length of ds_tensor, padding included
    start: int  # first valid flat element held by this rank (clamped to numel)
    end: int  # one past the last valid flat element (end >= start)
    in_features: int  # row length: last dim; for 1-D (and 0-D) params the whole tensor is one row

    @property
    def valid(self) -> int:
        """Number of real (non-padding) elements in this rank's ds_tensor."""
        return self.end - self.start

    @property
    def row_start(self) -> int:
        """First row touched by this rank (equals row_end when the rank holds nothing)."""
        return self.start // self.in_features

    @property
    def row_end(self) -> int:
        """One past the last row touched; row_start when the range is empty."""
        return max(self.row_start, -(-self.end // self.in_features))

    @property
    def num_rows(self) -> int:
        """Rows of the local row block."""
        return self.row_end - self.row_start

    @property
    def head_offset(self) -> int:
        """Offset of the first valid element inside the row block (elements of row_start before it are not ours)."""
        return self.start - self.row_start * self.in_features

    @property
    def first_row_partial(self) -> bool:
        """True when this rank holds only part of row_start (it starts late or ends early in that row)."""
        if self.valid == 0:
            return False
        row_lo = self.row_start * self.in_features
        return self.start > row_lo or self.end < row_lo + self.in_features

    @property
    def last_row_partial(self) -> bool:
        """True when this rank holds only part of row_end - 1."""
        if self.valid == 0:
            return False
        row_lo = (self.row_end - 1) * self.in_features
        return self.start > row_lo or self.end < row_lo + self.in_features


def _row_length(shape: tuple[int, ...], numel: int) -> int:
    return shape[-1] if len(shape) >= 2 else numel


def shard_range(numel: int, shape: tuple[int, ...], world: int, rank: int) -> ShardRange:
    """Flat range and row geometry of `rank`'s ZeRO-3 partition of a parameter of `shape`.

    Mirrors DeepSpeed 0.19.8 exactly: P = aligned_size // world with aligned_size = numel rounded up to a
    multiple of world (partition_parameters.py:1690-1697, 1816-1817), i.e. P = ceil(numel / world).
    """
    shape = tuple(int(d) for d in shape)
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must satisfy 0 <= rank < world={world}, got {rank}")
    if any(d < 0 for d in shape) or math.prod(shape) != numel:
        raise ValueError(f"shape {shape} does not hold numel={numel} elements")
    if numel < 1:
        raise ValueError(f"empty parameter (shape {shape}) has no partition geometry")
    partition_size = -(-numel // world)
    start = min(rank * partition_size, numel)
    end = min(start + partition_size, numel)
    return ShardRange(
        rank=rank,
        world=world,
        numel=numel,
        partition_size=partition_size,
        start=start,
        end=end,
        in_features=_row_length(shape, numel),
    )


def all_shard_ranges(shape: tuple[int, ...], world: int) -> list[ShardRange]:
    """Every rank's range, in rank order: for planning collectives and for single-process tests."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    numel = math.prod(shape)
    return [shard_range(numel, shape, world, r) for r in range(world)]


def valid_mask_of_block(rng: ShardRange, device: torch.device | str | None = None) -> Tensor:
    """`num_rows × in_features` bool mask, True where the row-block element belongs to this rank.

    Lets callers keep boundary-row elements owned by neighbouring ranks out of local reductions.
    """
    mask = torch.zeros(rng.num_rows * rng.in_features, dtype=torch.bool, device=device)
    mask[rng.head_offset : rng.head_offset + rng.valid] = True
    return mask.view(rng.num_rows, rng.in_features)


def row_block(flat_local: Tensor, rng: ShardRange) -> Tensor:
    """This rank's valid elements placed into a zero-filled `num_rows × in_features` block.

    Accepts the raw ds_tensor (P elements, padding is sliced off, never read) or just the valid slice.
    Zero fill makes the blocks of all ranks sum to the full matrix, and keeps padding garbage out of scores.
    Same dtype/device as the input; differentiable.
    """
    flat = flat_local.reshape(-1)
    if flat.numel() < rng.valid:
        raise ValueError(f"local shard has {flat.numel()} elements, rank {rng.rank} needs at least {rng.valid}")
    block = flat.new_zeros(rng.num_rows * rng.in_features)
    block[rng.head_offset : rng.head_offset + rng.valid] = flat[: rng.valid]
    return block.view(rng.num_rows, rng.in_features)


def from_row_block(block: Tensor, rng: ShardRange) -> Tensor:
    """Inverse of row_block: the `rng.valid` flat elements this rank owns, out of a row block.

    Returns a view where possible; copy it into `ds_tensor[:valid]` to write a result back.
    """
    if tuple(block.shape) != (rng.num_rows, rng.in_features):
        raise ValueError(
            f"row block has shape {tuple(block.shape)}, rank {rng.rank} expects ({rng.num_rows}, {rng.in_features})"
        )
    return block.reshape(-1)[rng.head_offset : rng.head_offset + rng.valid]


def owned_rows(rng: ShardRange) -> range:
    """Rows this rank owns: those whose first element lies in `[start, end)`. Over all ranks these partition the
    rows exactly once; the owner makes every per-row decision of a prune event (zero3.Zero3Linear.owned)."""
    first = -(-rng.start // rng.in_features)
    last = -(-rng.end // rng.in_features)
    return range(first, max(first, last))


def boundary_rows(rng: ShardRange) -> list[int]:
    """Rows touched by this rank but not wholly held by it (at most two): the rows whose fragments
    zero3.Zero3Linear.complete_rows exchanges."""
    rows: list[int] = []
    if rng.first_row_partial:
        rows.append(rng.row_start)
    if rng.last_row_partial and rng.row_end - 1 not in rows:
        rows.append(rng.row_end - 1)
    return rows
