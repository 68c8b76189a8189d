"""SparseGPT one-shot pruning (Frantar & Alistarh 2023), the "LoRA then SparseGPT" baseline of algorithm.md §7.

Pure tensor code: the caller supplies the layer weight W (out×in) and its calibration Hessian H = XᵀX (in×in).
Unlike the original, the unstructured mask is chosen per row, so that every row ends with exactly
`floor(p·in)` zeros (algorithm.md §8); N:M keeps the original per-group selection.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from exert_ds.prune.pattern import check_pattern


def _check(weight: Tensor, hessian: Tensor, sparsity: float, n: int, m: int, blocksize: int, percdamp: float) -> None:
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"SparseGPT shapes disagree: weight {tuple(weight.shape)}, hessian {tuple(hessian.shape)}")
    check_pattern(sparsity, n, m, weight.shape[1])
    if blocksize < 1 or not percdamp >= 0:
        raise ValueError(f"SparseGPT needs blocksize >= 1 and percdamp >= 0, got {blocksize}, {percdamp}")
    if m and blocksize % m:
        raise ValueError(f"SparseGPT N:M needs m={m} to divide blocksize={blocksize}")


def _inverse_hessian_factor(hessian: Tensor, dead: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, with dead inputs set to H_cc = 1 and λ = percdamp·mean(diag H)."""
    H = hessian.clone()
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx[dead], idx[dead]] = 1
    H[idx, idx] += percdamp * torch.mean(torch.diagonal(H))
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Prune `weight` (out×in) with SparseGPT; returns (new_weight, keep), keep True = kept, shape of weight.

    With U the upper Cholesky factor of the damped inverse Hessian, columns are eliminated left to right: for
    column j, err = (w_j − q_j) / U_jj (q_j = 0 if pruned, else w_j) and w_{j:} −= err · U_{j,j:}; within a
    128-column block the update is applied column by column, to the later columns lazily after the block.
    Mask: in block [i1, i2) each row prunes its floor(p·i2) − floor(p·i1) lowest w²/U_jj² (ties: lower column),
    w as updated so far; N:M prunes the n lowest per group of m columns. Computed in float32 (float64 inputs stay
    float64); new_weight is returned in weight's dtype, with pruned entries exactly 0.
    """
    _check(weight, hessian, sparsity, n, m, blocksize, percdamp)
    return _eliminate(weight, hessian, blocksize, percdamp, sparsity=sparsity, n=n, m=m)


def obs_reconstruct(
    weight: Tensor, hessian: Tensor, keep: Tensor, blocksize: int = 128, percdamp: float = 0.01
) -> Tensor:
    """SparseGPT's column-blocked optimal-brain-surgeon update with the mask fixed (algorithm.md §8,
    `prune.reconstruct: obs`): the entries with `keep` False are eliminated left to right as in `sparsegpt_prune`,
    each one's error spread over the row's later columns through the upper Cholesky factor of (H + λI)⁻¹, and the
    kept entries absorb it. weight, keep: (out, in); hessian: (in, in) = XᵀX. Rows are independent given H, so
    any subset of complete rows gives the same result for those rows. Returns the new weight in weight's dtype,
    with the pruned entries exactly 0 (dead inputs, H_cc = 0, keep their values: they meet no calibration token).
    Raises ValueError on shapes that disagree."""
    if keep.shape != weight.shape:
        raise ValueError(f"OBS reconstruction shapes disagree: weight {tuple(weight.shape)}, keep {tuple(keep.shape)}")
    _check(weight, hessian, 0.0, 0, 0, blocksize, percdamp)
    return _eliminate(weight, hessian, blocksize, percdamp, keep=keep)[0]


def _eliminate(
    weight: Tensor,
    hessian: Tensor,
    blocksize: int,
    percdamp: float,
    sparsity: float = 0.0,
    n: int = 0,
    m: int = 0,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The sequential OBS elimination shared by both: the mask chosen per block (`keep` None) or given."""
    dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    W = weight.detach().to(dtype=dtype, copy=True)
    H = hessian.detach().to(device=W.device, dtype=dtype)
    columns = W.shape[1]
    dead = torch.diagonal(H) == 0
    if keep is None:
        W[:, dead] = 0
    Hinv = _inverse_hessian_factor(H, dead, percdamp)
    prune = torch.zeros_like(W, dtype=torch.bool) if keep is None else ~keep.to(W.device)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d2 = torch.diagonal(Hinv1).square()
        mask1 = prune[:, i1:i2].clone()
        if keep is None and n == 0:
            k = math.floor(sparsity * i2) - math.floor(sparsity * i1)
            if k > 0:
                order = torch.argsort(W1.square() / d2, dim=1, stable=True)
                mask1.scatter_(1, order[:, :k], True)
        for i in range(i2 - i1):
            if keep is None and n != 0 and i % m == 0:
                order = torch.argsort(W1[:, i : i + m].square() / d2[i : i + m], dim=1, stable=True)
                mask1.scatter_(1, i + order[:, :n], True)
            w = W1[:, i]
            err = torch.where(mask1[:, i], w, torch.zeros_like(w)) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W1[mask1] = 0
        W[:, i1:i2] = W1
        prune[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return W.to(weight.dtype), ~prune
