"""ForeSight Mask: propagation-aware pruning scores and row-wise selection (algorithm.md §1-3).

`S[row, c] = |U[row, c]| · x̂_c · F_role[row, c]` with `x̂_c = sqrt(E_c)` (E = Σ_tokens x_c²) and the
companion factor F read from the *other* projections of the same block:

| role | F[row, c] |
|---|---|
| q, row (h,e)  | ‖U_k[(h//G, ·), c]‖₂                        (per KV head, per input column) |
| k, row (g,e)  | sqrt(mean_{h∈g} ‖U_q[(h, ·), c]‖₂²)        (RMS over the group's query heads) |
| v, row (g,e)  | sqrt(mean_{h∈g} ‖U_o[:, (h,e)]‖₂²)          (constant along the row) |
| o, row c′     | (‖U_gate[:, c′]‖₂ + ‖U_up[:, c′]‖₂) / 2    (constant along the row) |
| gate, up, c   | ‖U_down[c, :]‖₂ |
| down          | 1 (plain Wanda on U) |

Every companion norm is a sum of squares over elements of one matrix. The code is split so that a
ZeRO-3 rank can compute those sums on its own row block (`companion_sumsq`), all-reduce them, and score
its rows (`companion_factors`, `role_scores`); `foresight_scores` is the same path on whole matrices.
A factor that is constant along a row cannot change a per-row mask; the square and root forms rank
identically within one event and differ only through the EMA (algorithm.md §1 remarks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from exert_ds.prune.pattern import check_pattern, pruned_per_row
from exert_ds.roles import ROLES


@dataclass(frozen=True)
class HeadGeometry:
    """Attention geometry of one decoder block (GQA: `num_kv_heads` divides `num_heads`)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_weights(cls, weights: dict[str, Tensor], num_heads: int, num_kv_heads: int) -> HeadGeometry:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        q_rows = weights["q"].shape[0]
        if q_rows % num_heads:
            raise ValueError(f"q has {q_rows} rows, not a multiple of num_heads={num_heads}")
        geom = cls(num_heads, num_kv_heads, q_rows // num_heads)
        kv_rows = num_kv_heads * geom.head_dim
        for role in ("k", "v"):
            if weights[role].shape[0] != kv_rows:
                raise ValueError(f"{role} has {weights[role].shape[0]} rows, expected num_kv_heads·head_dim={kv_rows}")
        return geom


@dataclass(frozen=True)
class Companion:
    """The companion factor of one role: `kind` says how `table` broadcasts onto (row, col).

    kind "head_col": table[row // head_dim, col]; "row": table[row]; "col": table[col]; "one": F = 1.
    """

    kind: str
    table: Tensor | None = None

    def on_rows(self, row_start: int, num_rows: int, head_dim: int) -> Tensor | float:
        """F restricted to rows [row_start, row_start + num_rows): broadcastable to (num_rows, in)."""
        if self.kind == "one":
            return 1.0
        if self.kind == "col":
            return self.table[None, :]
        rows = torch.arange(row_start, row_start + num_rows, device=self.table.device)
        if self.kind == "row":
            return self.table[rows][:, None]
        return self.table[rows // head_dim]  # head_col


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def companion_sumsq(role: str, rows: Tensor, row_start: int, num_rows_total: int, geom: HeadGeometry) -> Tensor | None:
    """Partial sums of squares of `rows` (a block of U starting at row `row_start`) that other roles read.

    Elements outside a rank's partition must be zero in `rows`; summing the returned tensors over all
    blocks (ranks) gives the whole matrix's sums. Shapes: q → (H, in), k → (Hkv, in) [per head, per
    column]; o, gate, up → (in,) [per column]; down → (out,) [per row]; v → None (no role reads v).
    """
    sq = rows.to(_work_dtype(rows)).square()
    if role in ("q", "k"):
        heads = geom.num_heads if role == "q" else geom.num_kv_heads
        head_of_row = torch.arange(row_start, row_start + rows.shape[0], device=rows.device) // geom.head_dim
        return sq.new_zeros(heads, rows.shape[1]).index_add_(0, head_of_row, sq)
    if role in ("o", "gate", "up"):
        return sq.sum(0)
    if role == "down":
        out = sq.new_zeros(num_rows_total)
        out[row_start : row_start + rows.shape[0]] = sq.sum(1)
        return out
    if role == "v":
        return None
    raise ValueError(f"unknown projection role {role!r}; expected one of {ROLES}")


def companion_factors(sumsq: dict[str, Tensor], geom: HeadGeometry) -> dict[str, Companion]:
    """Companion factor of every role from the block's (all-reduced) sums of squares."""
    g, hkv, d = geom.group, geom.num_kv_heads, geom.head_dim
    k_head_norm = sumsq["k"].sqrt()  # (Hkv, in)
    q_group_rms = sumsq["q"].view(hkv, g, -1).mean(1).sqrt()  # (Hkv, in)
    o_group_rms = sumsq["o"].view(hkv, g, d).mean(1).sqrt().reshape(-1)  # (Hkv·d,)
    mlp_read = (sumsq["gate"].sqrt() + sumsq["up"].sqrt()) / 2  # (hidden,)
    down_write = sumsq["down"].sqrt()  # (hidden,)
    return {
        "q": Companion("head_col", k_head_norm.repeat_interleave(g, dim=0)),
        "k": Companion("head_col", q_group_rms),
        "v": Companion("row", o_group_rms),
        "o": Companion("row", mlp_read),
        "gate": Companion("col", down_write),
        "up": Companion("col", down_write),
        "down": Companion("one"),
    }


def role_scores(rows: Tensor, row_start: int, act_energy: Tensor, companion: Companion, head_dim: int) -> Tensor:
    """`|U| · sqrt(E) · F` on a block of rows of one matrix (float32, or float64 for float64 input)."""
    dtype = _work_dtype(rows)
    x_hat = act_energy.to(dtype).clamp_min(0).sqrt()
    factor = companion.on_rows(row_start, rows.shape[0], head_dim)
    if isinstance(factor, Tensor):
        factor = factor.to(dtype)
    return rows.to(dtype).abs() * x_hat[None, :] * factor


def foresight_scores(
    weights: dict[str, Tensor], act_energy: dict[str, Tensor], num_heads: int, num_kv_heads: int
) -> dict[str, Tensor]:
    """ForeSight scores of one block.

    weights: role → effective weight U = W + s·B·A (out×in) for all seven roles; act_energy: role → E
    (in,), E_c = Σ_tokens x_c². Returns role → S (out×in). All companions are read from `weights` as
    given (the block's pre-event effective weights), so the result does not depend on role order.
    """
    missing = [r for r in ROLES if r not in weights or r not in act_energy]
    if missing:
        raise ValueError(f"foresight_scores needs all seven roles; missing {missing}")
    geom = HeadGeometry.from_weights(weights, num_heads, num_kv_heads)
    sumsq = {
        role: companion_sumsq(role, weights[role], 0, weights[role].shape[0], geom) for role in ROLES if role != "v"
    }
    factors = companion_factors(sumsq, geom)
    return {role: role_scores(weights[role], 0, act_energy[role], factors[role], geom.head_dim) for role in ROLES}


def ema_scores(new: Tensor, previous: Tensor | None, eta: float) -> Tensor:
    """`η·S + (1 − η)·S_prev` (algorithm.md §2); the first event (previous is None) uses S alone."""
    if previous is None:
        return new
    return eta * new + (1.0 - eta) * previous.to(new.device, new.dtype)


def row_mask(scores: Tensor, sparsity: float, n: int = 0, m: int = 0) -> Tensor:
    """Keep-mask (True = keep) that prunes, per row, the lowest scores.

    Unstructured: exactly floor(p·in) entries per row. N:M (n, m > 0): exactly N per group of M
    consecutive columns. Ties go to the lower column index (stable ascending sort prunes it first).
    """
    rows, cols = scores.shape
    check_pattern(sparsity, n, m, cols)
    if n or m:
        grouped = scores.reshape(rows, cols // m, m)
        order = torch.argsort(grouped, dim=-1, stable=True)[..., :n]
        keep = torch.ones_like(grouped, dtype=torch.bool)
        keep.scatter_(-1, order, False)
        return keep.reshape(rows, cols)
    k = pruned_per_row(sparsity, cols)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        order = torch.argsort(scores, dim=1, stable=True)[:, :k]
        keep.scatter_(1, order, False)
    return keep
