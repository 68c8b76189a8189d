"""Grassmann distances between LoRA subspaces, and between an adapter and the weight it adapts.

A LoRA update s·B·A (B: out × r, A: r × in) moves W only inside the column space of B (a subspace of R^out) and
the row space of A (a subspace of R^in). Two adapters of one projection are compared through those subspaces,
and an adapter is compared with the top-r singular subspaces of the base weight W = U Σ Vᵀ (col(B) with span of
U's first r columns, row(A) with span of V's first r columns).

Principal angles (Björck & Golub, "Numerical methods for computing angles between linear subspaces", Math. Comp.
27 (1973)): for orthonormal bases Q1 (n × p), Q2 (n × q), the singular values σ_i of Q1ᵀQ2 are cos θ_i,
i = 1..min(p, q). Small angles lose accuracy through arccos; they are taken from the sines instead, the singular
values of Q2 − Q1(Q1ᵀQ2) (Knyazev & Argentati, SIAM J. Sci. Comput. 23 (2002), "Principal angles between subspaces
in an A-based scalar product", Alg. 3.1). The Grassmann (arc-length) distance is d = sqrt(Σ_i θ_i²)
(Edelman, Arias & Smith, "The geometry of algorithms with orthogonality constraints", SIAM J. Matrix Anal. Appl.
20 (1998), §4.3; the distance the EfficientXpert paper plots, arXiv 2511.19935 Figures 2(d) and 5): 0 for one
subspace, π/2·sqrt(min(p, q)) for orthogonal ones. All in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from exert_ds.analysis.sources import WeightSource, projection_weight
from exert_ds.errors import ConfigError

RANK_TOL = 1e-10  # singular values below RANK_TOL·σ_max do not span the subspace


def orthonormal_basis(m: Tensor, rank: int | None = None) -> Tensor:
    """An orthonormal basis (n × k, float64) of the column space of `m` (n × p): its left singular vectors with
    singular values above RANK_TOL·σ_max (the first `rank` of them when given). ValueError for a zero matrix."""
    u, s, _ = torch.linalg.svd(m.double(), full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        raise ValueError("the matrix is zero: it spans no subspace")
    keep = int((s > RANK_TOL * s[0]).sum())
    return u[:, : keep if rank is None else min(rank, keep)]


def principal_angles(q1: Tensor, q2: Tensor) -> Tensor:
    """Principal angles (radians, ascending, min(p, q) of them) between span(q1) and span(q2), both orthonormal
    bases of one space (n × p, n × q). Cosines for angles ≥ π/4, sines below (Knyazev & Argentati 2002)."""
    if q1.shape[0] != q2.shape[0]:
        raise ValueError(f"bases of R^{q1.shape[0]} and R^{q2.shape[0]}: not subspaces of one space")
    if q1.shape[1] > q2.shape[1]:
        q1, q2 = q2, q1
    q1, q2 = q1.double(), q2.double()
    cross = q1.T @ q2  # p × q
    cos = torch.linalg.svdvals(cross).clamp(0.0, 1.0)  # cos θ_1 ≥ … ≥ cos θ_p: angles ascending
    # (I − Q1Q1ᵀ)Q2 has singular values sin θ_i and q − p ones (Q2ᵀ(I − Q1Q1ᵀ)Q2 = I − crossᵀcross): drop the ones
    sin = torch.linalg.svdvals(q2 - q1 @ cross).clamp(0.0, 1.0)[q2.shape[1] - q1.shape[1] :].flip(0)
    return torch.where(cos > math.sqrt(0.5), torch.arcsin(sin), torch.arccos(cos))


def grassmann_distance(x: Tensor, y: Tensor) -> float:
    """sqrt(Σ θ_i²) between the column spaces of x (n × p) and y (n × q), from their principal angles."""
    return float(principal_angles(orthonormal_basis(x), orthonormal_basis(y)).square().sum().sqrt())


def top_singular_subspaces(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(U_r, V_r): orthonormal bases (out × r, in × r, float64) of W's top-r left and right singular subspaces."""
    u, _, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return u[:, :r], vh[:r].T


def adapter_distances(a: Tensor, b: Tensor, other_a: Tensor, other_b: Tensor) -> dict[str, float]:
    """Grassmann distances of two adapters of one projection: `col_B` between the column spaces of B (out × r),
    `row_A` between the row spaces of A (r × in)."""
    return {"col_B": grassmann_distance(b, other_b), "row_A": grassmann_distance(a.T, other_a.T)}


def weight_distances(a: Tensor, b: Tensor, weight: Tensor) -> dict[str, float]:
    """Grassmann distances between an adapter and the top-r singular subspaces of the weight W (out × in) it
    adapts, r = the adapter's rank: `col_B` against W's left, `row_A` against W's right singular subspace."""
    left, right = top_singular_subspaces(weight, a.shape[0])
    return {
        "col_B": float(principal_angles(orthonormal_basis(b), left).square().sum().sqrt()),
        "row_A": float(principal_angles(orthonormal_basis(a.T), right).square().sum().sqrt()),
    }


def _pair(adapters: dict, key: tuple[int, str], where: str) -> tuple[Tensor, Tensor]:
    if key not in adapters:
        raise ConfigError(f"{where} has no adapter for block {key[0]} role {key[1]!r}; give adapters of every block")
    a, b = adapters[key]
    if not bool(a.any()) or not bool(b.any()):
        raise ConfigError(
            f"{where}: block {key[0]} role {key[1]!r} has an all-zero LoRA {'A' if not bool(a.any()) else 'B'}, which "
            "spans no subspace: the adapter has not trained yet (a learning rate still 0 in the warm-up), or it is a "
            "checkpoint written right after a prune event (which re-initialises it); give a trained adapter"
        )
    return a, b


def compare_adapters(
    x: dict, y: dict, roles: tuple[str, ...], num_layers: int, names: tuple[str, str]
) -> dict[str, list[dict[str, float]]]:
    """role → per block {col_B, row_A}: Grassmann distances between adapters `x` and `y` ((block, role) → (A, B));
    `names` label them in errors. ConfigError for a missing adapter, a zero one, or other shapes."""
    out: dict[str, list[dict[str, float]]] = {role: [] for role in roles}
    for block in range(num_layers):
        for role in roles:
            a, b = _pair(x, (block, role), names[0])
            a2, b2 = _pair(y, (block, role), names[1])
            if a.shape[1] != a2.shape[1] or b.shape[0] != b2.shape[0]:
                raise ConfigError(
                    f"{names[1]}: block {block} role {role!r} adapts a {b2.shape[0]}×{a2.shape[1]} weight, {names[0]} "
                    f"a {b.shape[0]}×{a.shape[1]} one; compare adapters of one base model"
                )
            out[role].append(adapter_distances(a, b, a2, b2))
    return out


def compare_with_weights(
    x: dict, source: WeightSource, roles: tuple[str, ...], name: str
) -> dict[str, list[dict[str, float]]]:
    """role → per block {col_B, row_A}: Grassmann distances between adapter `x` and the top-r singular subspaces of
    the base weights in `source` (read one projection at a time)."""
    out: dict[str, list[dict[str, float]]] = {role: [] for role in roles}
    for block in range(source.num_layers):
        for role in roles:
            a, b = _pair(x, (block, role), name)
            weight = projection_weight(source, block, role)
            if tuple(weight.shape) != (b.shape[0], a.shape[1]):
                raise ConfigError(
                    f"{name}: block {block} role {role!r} adapts a {b.shape[0]}×{a.shape[1]} weight, {source.path} "
                    f"holds {tuple(weight.shape)}; give the base model the adapter was trained on"
                )
            out[role].append(weight_distances(a, b, weight))
    return out
