"""Sparse storage of one flat partition of a pruned weight, small enough to beat 0.56× of dense at 50%.

A packed bitmask (1 bit per element, set = non-zero) says where the kept values go. A bitmask plus the raw kept
values costs 1/16 + 1/2 = 0.5625 of dense bf16 at 50% sparsity, and the mask cannot shrink (a 50% random mask
holds about 1 bit per element). The values can: their top byte (sign and high exponent bits) takes few distinct
values in a weight matrix, so it is coded in 4 bits: codes 0..14 index a 15-entry table of the most frequent top
bytes, code 15 means "next byte of the escape list". The other bytes of each value are stored raw. bf16 at 50%:
1/16 + 1/2·(1/2 + 1/4) ≈ 0.44 of dense, plus the escapes (rare). Keys per tensor: `.mask`, `.low`
(kept values' low bytes, nnz × (element size − 1)), `.codes` (two 4-bit codes per byte, the first in the low
nibble), `.table` (15 bytes), `.escapes`. Assumes a little-endian host (the top byte is the last).

Kept by hand because no library stores this: compressed-tensors' sparse-bitmask format (0.13) packs the same
kind of bitmask but keeps the values raw, 0.5625× of dense bf16 at 50%, and it works on whole 2-D weights, not
on one rank's flat ZeRO-3 partition. torch's sparse layouts (COO, CSR) cost an index per kept value, and
safetensors stores dense tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

TABLE = 15  # codes 0..14 index the table; 15 escapes
ESCAPE = 15
CHUNK = 1 << 24  # elements decoded at a time (a multiple of 8: chunks start on a mask byte)


@dataclass(frozen=True)
class SparseLayout:
    """Sizes of one encoded partition (known before any byte is written) and its top-byte table."""

    numel: int
    nnz: int
    element_size: int
    table: tuple[int, ...]
    escapes: int


def _top_bytes(kept: Tensor) -> Tensor:
    return kept.view(torch.uint8).view(-1, kept.element_size())[:, -1]


def plan(flat: Tensor) -> SparseLayout:
    """Count non-zeros and choose the top-byte table (on the partition's own device)."""
    kept = flat[flat != 0]
    counts = torch.bincount(_top_bytes(kept).int(), minlength=256)
    table = torch.argsort(-counts, stable=True)[:TABLE]
    escapes = kept.numel() - int(counts[table].sum())
    return SparseLayout(flat.numel(), kept.numel(), flat.element_size(), tuple(int(t) for t in table), escapes)


def specs(layout: SparseLayout) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(key suffix, dtype, shape) of the stored pieces, in file order."""
    return [
        ("mask", torch.uint8, (-(-layout.numel // 8),)),
        ("low", torch.uint8, (layout.nnz, layout.element_size - 1)),
        ("codes", torch.uint8, (-(-layout.nnz // 2),)),
        ("table", torch.uint8, (TABLE,)),
        ("escapes", torch.uint8, (layout.escapes,)),
    ]


def encode(flat: Tensor, layout: SparseLayout) -> dict[str, Tensor]:
    """The pieces of `specs(layout)`, on the host."""
    flat = flat.detach().reshape(-1).cpu()
    keep = flat != 0
    kept = flat[keep]
    raw = kept.view(torch.uint8).view(-1, layout.element_size)
    lookup = torch.full((256,), ESCAPE, dtype=torch.uint8)
    lookup[torch.tensor(layout.table, dtype=torch.long)] = torch.arange(TABLE, dtype=torch.uint8)
    codes = lookup[raw[:, -1].long()]
    escapes = raw[:, -1][codes == ESCAPE]
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return {
        "mask": torch.from_numpy(np.packbits(keep.numpy())),
        "low": raw[:, :-1].contiguous(),
        "codes": codes[0::2] | (codes[1::2] << 4),
        "table": torch.tensor(layout.table, dtype=torch.uint8),
        "escapes": escapes.contiguous(),
    }


_INT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # numpy views of each element size (no bf16)


def bits_view(tensor: Tensor) -> np.ndarray:
    """The raw bits of a CPU tensor as a numpy array of unsigned ints of the same element size (no copy)."""
    return tensor.view(getattr(torch, f"uint{8 * tensor.element_size()}")).numpy()


def decode_into(out: Tensor, piece) -> None:
    """Fill the flat CPU `out` (its dtype is the stored one) from the pieces; `piece(key)` returns something
    sliceable along the first dimension (a tensor, or a lazy safetensors slice): CHUNK elements at a time."""
    size = out.element_size()
    dst = bits_view(out)
    table = np.zeros(16, dtype=np.uint8)
    table[:TABLE] = piece("table")[:TABLE].numpy()
    mask, low, codes, escapes = piece("mask"), piece("low"), piece("codes"), piece("escapes")
    taken = escaped = 0
    for start in range(0, out.numel(), CHUNK):
        count = min(CHUNK, out.numel() - start)
        part = dst[start : start + count]
        part[:] = 0
        keep = np.unpackbits(mask[start // 8 : (start + count + 7) // 8].numpy(), count=count).view(bool)
        kept = int(np.count_nonzero(keep))
        if not kept:
            continue
        packed = codes[taken // 2 : (taken + kept + 1) // 2].numpy()
        nibbles = np.empty(2 * packed.size, dtype=np.uint8)
        nibbles[0::2], nibbles[1::2] = packed & 15, packed >> 4
        nibbles = nibbles[taken % 2 : taken % 2 + kept]
        raw = np.empty((kept, size), dtype=np.uint8)
        raw[:, -1] = table[nibbles]
        is_escape = nibbles == ESCAPE
        n_escape = int(np.count_nonzero(is_escape))
        if n_escape:
            raw[is_escape, -1] = escapes[escaped : escaped + n_escape].numpy()
        raw[:, :-1] = low[taken : taken + kept].numpy()
        part[keep] = raw.view(_INT[size]).reshape(-1)
        taken += kept
        escaped += n_escape
