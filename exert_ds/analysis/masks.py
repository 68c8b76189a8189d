"""Mask overlap between sparse experts of one base model: per block and role, how alike their kept sets are.

The kept set of a matrix is its non-zero entries (a sparse expert stores exactly those; merging never densifies).
For two experts A, B and one projection (out × in):
- `iou`: |A ∩ B| / |A ∪ B| pooled over the whole matrix (all rows' kept entries counted together);
- `identical_rows`: the fraction of rows whose kept sets are equal;
- `random_iou`: what `iou` would be in expectation for two independent uniformly random masks with the same number
  of kept entries per row (derivation in `expected_random_iou`);
- `chance_corrected`: (iou − random_iou) / (1 − random_iou): 0 at chance, 1 for identical masks, negative when the
  masks avoid each other (Cohen's kappa's correction, applied to the IoU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from exert_ds.analysis.sources import WeightSource, check_same_model
from exert_ds.errors import ConfigError

ROW_CHUNK = 1 << 22  # elements compared at a time


@dataclass(frozen=True)
class MaskOverlap:
    iou: float
    identical_rows: float
    random_iou: float
    chance_corrected: float
    kept_a: float  # fraction of entries kept in A
    kept_b: float


def expected_random_iou(kept_a: Tensor, kept_b: Tensor, n: int) -> float:
    """Expected pooled IoU of two independent random masks with `kept_a[i]`, `kept_b[i]` entries kept in row i of
    n columns (kept_*: (rows,) integer counts).

    Derivation: in row i, A keeps a set of a_i columns and B, independently and uniformly, b_i of n. Each of A's
    a_i columns is in B with probability b_i / n, so |A_i ∩ B_i| is hypergeometric with mean E|A_i ∩ B_i| = a_i·b_i/n
    (k²/n for a_i = b_i = k), and E|A_i ∪ B_i| = a_i + b_i − a_i·b_i/n. The pooled IoU is Σ_i|A_i ∩ B_i| / Σ_i|A_i ∪ B_i|;
    the rows are independent, so by the law of large numbers over rows it tends to
    Σ_i a_i·b_i/n / Σ_i (a_i + b_i − a_i·b_i/n), the value returned. For a_i = b_i = k in every row this is
    k / (2n − k): 1/3 at 50% sparsity, and the exact expectation of the ratio differs from it by O(1/(rows·k)).
    """
    a, b = kept_a.double(), kept_b.double()
    inter = (a * b / n).sum()
    union = (a + b).sum() - inter
    return float(inter / union) if union > 0 else 1.0


def mask_overlap(keep_a: Tensor, keep_b: Tensor) -> MaskOverlap:
    """Overlap of two boolean keep-masks of one shape (rows × n, True = kept). Two empty masks count as identical."""
    if keep_a.shape != keep_b.shape or keep_a.dim() != 2:
        raise ValueError(f"masks of shapes {tuple(keep_a.shape)} and {tuple(keep_b.shape)}: need one 2-D shape")
    rows, n = keep_a.shape
    inter = union = identical = 0
    kept_a = torch.empty(rows, dtype=torch.long)
    kept_b = torch.empty(rows, dtype=torch.long)
    step = max(1, ROW_CHUNK // max(n, 1))
    for first in range(0, rows, step):
        a, b = keep_a[first : first + step], keep_b[first : first + step]
        inter += int((a & b).sum())
        union += int((a | b).sum())
        identical += int((a == b).all(1).sum())
        kept_a[first : first + step] = a.sum(1)
        kept_b[first : first + step] = b.sum(1)
    iou = inter / union if union else 1.0
    random_iou = expected_random_iou(kept_a, kept_b, n)
    corrected = (iou - random_iou) / (1.0 - random_iou) if random_iou < 1.0 else 1.0
    size = rows * n
    return MaskOverlap(
        iou, identical / rows, random_iou, corrected, float(kept_a.sum()) / size, float(kept_b.sum()) / size
    )


def compare_masks(a: WeightSource, b: WeightSource, roles: tuple[str, ...]) -> dict[str, list[dict[str, float]]]:
    """role → per block (index = block) the MaskOverlap fields of experts `a` and `b`. Reads one projection of
    each at a time. ConfigError if they are not experts of one base model."""
    check_same_model([a, b])
    out: dict[str, list[dict[str, float]]] = {role: [] for role in roles}
    for block in range(a.num_layers):
        for role in roles:
            name = a.role_name(block, role)
            if name not in a.shapes:
                raise ConfigError(f"{a.path} has no {name} (role {role!r}); is it a decoder-only causal LM?")
            keep_a = a.tensor(name) != 0
            keep_b = b.tensor(name) != 0
            out[role].append(asdict(mask_overlap(keep_a, keep_b)))
            del keep_a, keep_b
    return out
