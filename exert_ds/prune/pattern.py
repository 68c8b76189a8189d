"""The sparsity pattern rule, written once: what `prune.sparsity` and the N:M pair `prune.n`/`prune.m` may be, and how
many entries each row loses (algorithm.md §3). The config check, the mask selection, SparseGPT and the expert's
promise all read it from here.
"""

from __future__ import annotations

import math


def pattern_problem(sparsity: float, n: int = 0, m: int = 0, in_features: int | None = None, what: str = "") -> str:
    """What is wrong with the pattern, as one line naming the config keys; "" when it is fine.

    sparsity must lie in [0, 1); N:M (n or m non-zero) needs 0 < n < m, and m must divide `in_features` (the row
    length of the matrix, named `what` in the message) when that is given."""
    if not 0.0 <= sparsity < 1.0:
        return f"config key 'prune.sparsity' must be in [0, 1), got {sparsity}"
    if not (n or m):
        return ""
    if not 0 < n < m:
        return f"config keys 'prune.n'/'prune.m' need 0 < n < m (e.g. 2 and 4), got {n}:{m}"
    if in_features is not None and in_features % m:
        return f"config keys 'prune.n'/'prune.m': M={m} does not divide {what or 'in_features'} ({in_features})"
    return ""


def check_pattern(sparsity: float, n: int = 0, m: int = 0, in_features: int | None = None, what: str = "") -> None:
    """Raise `ValueError(pattern_problem(...))` when the pattern cannot be honoured."""
    problem = pattern_problem(sparsity, n, m, in_features, what)
    if problem:
        raise ValueError(problem)


def pruned_per_row(sparsity: float, in_features: int, n: int = 0, m: int = 0) -> int:
    """How many entries each row of width `in_features` loses: floor(p·in), or N per group of M."""
    if n or m:
        return n * (in_features // m)
    return math.floor(sparsity * in_features)
