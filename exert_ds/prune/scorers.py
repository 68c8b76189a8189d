"""The scorer registry: a new pruning criterion is one `@register` class (here, or in a module imported before the
run config is read); `prune.scorer` accepts every registered name.

A scorer declares what it needs and what it does, and the event (event.py) and the config check (config.py) ask it
instead of naming scorers:

- `needs_hessian`: the event collects H = XᵀX of each linear's input, summed in float64 over tokens, micro-batches
  and ranks (so the result does not depend on the order of that sum), and hands the scorer that float64 sum.
- `updates_weights`: the scorer prunes and updates the kept weights itself (`UpdatingScorer.prune_rows`); PBS
  would move into the adapter what such an update already absorbed, so the config refuses the two together.
- `needs_all_roles`: the scores of one role read other roles' weights (LoRA on all seven projections).

A `MaskScorer` returns scores on each role's row block; the event applies the EMA, selects per row (row_mask) and
runs PBS. An `UpdatingScorer` gets whole rows (boundary rows completed from the other ranks' fragments) that this
process owns, so that each row is decided once, by one rank, whatever the sharding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from exert_ds.prune.foresight import ROLES, HeadGeometry, companion_factors, companion_sumsq, role_scores
from exert_ds.prune.sparsegpt import sparsegpt_prune


@dataclass(frozen=True)
class BlockInputsForScoring:
    """What a mask scorer may read about one decoder block on this process.

    effective: role → U = W + s·B·A on this process's row block, (rows_held, in), zero where not held;
    row_start: role → first row of that block in the full matrix; out_features: role → rows of the full matrix;
    energy: role → E (in,), E_c = Σ_tokens x_c² over all ranks; heads: the block's attention geometry;
    all_reduce: in-place sum over processes (identity on one process)."""

    effective: dict[str, Tensor]
    row_start: dict[str, int]
    out_features: dict[str, int]
    energy: dict[str, Tensor]
    heads: HeadGeometry
    all_reduce: Callable[[Tensor], Tensor]


class Scorer(ABC):
    """A pruning criterion. Subclass `MaskScorer` or `UpdatingScorer` and decorate with `@register`."""

    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False
    updates_weights: ClassVar[bool] = False
    needs_all_roles: ClassVar[bool] = False


class MaskScorer(Scorer):
    """Scores only; the event selects the lowest per row and may run PBS."""

    @abstractmethod
    def scores(self, block: BlockInputsForScoring) -> dict[str, Tensor]:
        """role → S on the role's row block, (rows_held, in), higher = keep. Elements not held may hold anything
        (the event zeroes them)."""


class UpdatingScorer(Scorer):
    """Chooses the mask and updates the kept weights of whole rows itself (one linear at a time)."""

    updates_weights = True

    @abstractmethod
    def prune_rows(
        self, rows: Tensor, hessian: Tensor | None, sparsity: float, n: int, m: int
    ) -> tuple[Tensor, Tensor]:
        """rows: (rows_owned, in) whole rows of U; hessian: (in, in) H when `needs_hessian`, else None. Returns
        (new_rows, keep), both (rows_owned, in); keep True = kept, new_rows exactly 0 where not kept; each row
        loses `pattern.pruned_per_row(...)` entries."""


SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make `cls` selectable as `prune.scorer: <cls.name>`."""
    if cls.name in SCORERS:
        raise ValueError(f"a scorer named {cls.name!r} is already registered ({SCORERS[cls.name].__qualname__})")
    SCORERS[cls.name] = cls
    return cls


def make_scorer(name: str) -> Scorer:
    """A fresh instance of the scorer registered as `name` (the config check has seen that there is one)."""
    return SCORERS[name]()


@register
class ForeSight(MaskScorer):
    """S = |U| · sqrt(E) · F_role with the companion factor of algorithm.md §1, from the block's pre-event U.

    The companion norms are sums of squares over row blocks, all-reduced, so every rank scores its rows with the
    whole matrices' norms."""

    name = "foresight"
    needs_all_roles = True

    def scores(self, block: BlockInputsForScoring) -> dict[str, Tensor]:
        heads = block.heads
        sumsq = {}
        for role in ROLES:
            part = companion_sumsq(
                role, block.effective[role], block.row_start[role], block.out_features[role], heads
            )  # q: (H, in), k: (Hkv, in), o/gate/up: (in,), down: (out,), v: None
            if part is not None:
                sumsq[role] = block.all_reduce(part)
        factors = companion_factors(sumsq, heads)
        return {
            role: role_scores(u, block.row_start[role], block.energy[role], factors[role], heads.head_dim)
            for role, u in block.effective.items()
        }


@register
class Wanda(MaskScorer):
    """S = |U| · sqrt(E) (Sun et al. 2023, on the effective weight; algorithm.md §7)."""

    name = "wanda"

    def scores(self, block: BlockInputsForScoring) -> dict[str, Tensor]:
        return {role: u.abs() * block.energy[role].sqrt()[None, :] for role, u in block.effective.items()}


@register
class Magnitude(MaskScorer):
    """S = |U| (one-shot magnitude baseline, algorithm.md §7)."""

    name = "magnitude"

    def scores(self, block: BlockInputsForScoring) -> dict[str, Tensor]:
        return {role: u.abs() for role, u in block.effective.items()}


@register
class SparseGPT(UpdatingScorer):
    """OBS pruning with the blocked inverse Hessian (Frantar & Alistarh 2023; sparsegpt.py), per-row selection.

    Solved in float64, on H as summed in float64: with H rounded to float32 (after a float64 sum) the weights still
    moved by 8-10e-6 between micro-batch 4 and 1 (issue 21's input); see `reduce` in calibration.py. It is a
    baseline, run once per layer; float64 costs about twice the float32 time on an H200."""

    name = "sparsegpt"
    needs_hessian = True
    blocksize: ClassVar[int] = 128  # columns eliminated together (the paper's default)
    percdamp: ClassVar[float] = 0.01  # damping λ = percdamp · mean(diag H)

    def prune_rows(
        self, rows: Tensor, hessian: Tensor | None, sparsity: float, n: int, m: int
    ) -> tuple[Tensor, Tensor]:
        if hessian is None:
            raise ValueError("SparseGPT needs the calibration Hessian H")
        new_rows, keep = sparsegpt_prune(
            rows.double(), hessian.double(), sparsity, n, m, self.blocksize, self.percdamp
        )  # (rows_owned, in) float64, (rows_owned, in) bool
        return new_rows.to(rows.dtype), keep
