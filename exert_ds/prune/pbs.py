"""Partial Brain Surgeon: closed-form update of LoRA B under a fixed mask (algorithm.md §4).

After the mask M (True = keep) is chosen and before merging, B is moved so that the merged, masked
weight `M ⊙ (W + s·(B + ΔB)·A)` reproduces the dense effective layer `U = W + s·B·A` as well as the
adapter's row space allows. Both modes are batched over rows (no Python loop over rows); rows are taken
in chunks only to bound the memory of the per-row r×in intermediates.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from exert_ds.config import MatmulPrecision

_CHUNK_ELEMENTS = 1 << 26  # bound for a chunk's rows × r × in intermediate (256 MiB in float32)


@contextmanager
def float32_matmul_precision(precision: MatmulPrecision) -> Iterator[None]:
    """Run the block with torch's float32 matmul precision set to `precision`, then restore the caller's.

    "high" lets CUDA use TF32 tensor cores for the r·in² per-row Gram products, the bulk of PBS hessian's work
    (4.4–6.6× faster on an H200, ΔB within about 4e-4 relative, eval/results/perf.md and perf/2026-11-29/); the r×r solves stay float32.
    """
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _work_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_shapes(W: Tensor, A: Tensor, B: Tensor, keep: Tensor, scale: float) -> None:
    out_f, in_f = W.shape
    r = A.shape[0]
    if A.shape != (r, in_f) or B.shape != (out_f, r) or keep.shape != W.shape:
        raise ValueError(
            f"PBS shapes disagree: W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, keep {tuple(keep.shape)}"
        )
    if scale == 0:
        raise ValueError("PBS needs a non-zero LoRA scale s = lora_alpha / r")


def _row_chunk(rows: int, r: int, in_features: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, r * in_features))


def partial_brain_surgeon(
    W: Tensor, A: Tensor, B: Tensor, scale: float, keep: Tensor, hessian: Tensor, reg: float = 1e-2
) -> Tensor:
    """New B under mode `hessian`: per row i, with p_i = (1 − M_i) ⊙ U_i, Â_i = A ⊙ M_i, H = XᵀX,

        Δb_i = (1/s) · p_i H Â_iᵀ · (Â_i H Â_iᵀ + λ'_i I)⁻¹,   λ'_i = reg · mean(diag(Â_i H Â_iᵀ)),

    the ridge-damped least-squares optimum of ‖(p_i − s·Δb·Â_i)·Xᵀ‖² (so the masked merge never
    reconstructs worse than ΔB = 0). Right-hand sides for all rows: `((P H) ⊙ M) @ Aᵀ`. Returns B + ΔB
    in B's dtype; computed in float32 (float64 if any input is float64).
    """
    return partial_brain_surgeon_with_errors(W, A, B, scale, keep, hessian, reg)[0]


def partial_brain_surgeon_with_errors(
    W: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    keep: Tensor,
    hessian: Tensor,
    reg: float = 1e-2,
    start_weight: Tensor | None = None,
) -> tuple[Tensor, float, float]:
    """`partial_brain_surgeon` plus the calibration reconstruction error `Σ_i d_i H d_iᵀ` of the masked merge,
    d_i = M_i ⊙ (U_i + s·Δb_i·A) − U_i, before (ΔB = 0: d_i = −p_i) and after PBS. Both come from products the
    solve needs anyway: p H pᵀ, and −2·y·rhs + y·G·yᵀ with y = s·Δb (no second pass over H).

    `start_weight` (out×in, zero where `keep` is False): the masked weights the merge starts from when they are not
    M ⊙ U, e.g. after `prune.reconstruct: obs` updated the kept entries (algorithm.md §8). Then p_i = U_i − start_i
    (what the kept weights could not absorb), the merge is start + M ⊙ (s·ΔB·A), and the same least-squares form
    holds, so PBS still never increases the error of the start."""
    _check_shapes(W, A, B, keep, scale)
    if start_weight is not None and start_weight.shape != W.shape:
        raise ValueError(f"PBS shapes disagree: W {tuple(W.shape)}, start_weight {tuple(start_weight.shape)}")
    dtype = _work_dtype(W, A, B, hessian)
    w, a, b, h = W.to(dtype), A.to(dtype), B.to(dtype), hessian.to(dtype)
    mask = keep.to(dtype)
    r, in_f = a.shape
    delta = torch.empty_like(b)
    before = after = torch.zeros((), dtype=torch.float64, device=w.device)
    step = _row_chunk(w.shape[0], r, in_f)
    eye = torch.eye(r, dtype=dtype, device=w.device)
    for start in range(0, w.shape[0], step):
        rows = slice(start, start + step)
        m = mask[rows]
        u = w[rows] + scale * (b[rows] @ a)
        pruned = u * (1 - m) if start_weight is None else u - start_weight[rows].to(dtype)  # p_i = U_i − start_i
        pruned_h = pruned @ h
        rhs = (pruned_h * m) @ a.T  # chunk × r
        masked_a = a[None] * m[:, None, :]
        gram = ((masked_a.reshape(-1, in_f) @ h).view_as(masked_a) * m[:, None, :]) @ a.T  # chunk × r × r
        damp = reg * gram.diagonal(dim1=1, dim2=2).mean(-1)
        damp = torch.where(damp > 0, damp, torch.ones_like(damp))  # Â_i = 0 ⇒ rhs = 0 ⇒ Δb_i = 0
        y = torch.linalg.solve(gram + damp[:, None, None] * eye, rhs.unsqueeze(-1))  # chunk × r × 1, y = s·Δb
        row_before = (pruned_h * pruned).sum(-1)
        row_after = row_before - 2 * (y.squeeze(-1) * rhs).sum(-1) + (y.transpose(1, 2) @ gram @ y).view(-1)
        before = before + row_before.sum().double()
        after = after + row_after.sum().double()
        delta[rows] = y.squeeze(-1) / scale
    return (b + delta).to(B.dtype), float(before), float(after)


def partial_brain_surgeon_reference(
    W: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    keep: Tensor,
    act_energy: Tensor,
    reg: float = 1e-8,
    keep_weight: float = 1.0,
) -> Tensor:
    """New B under mode `reference`: the authors' objective with their two bugs fixed (U includes s;
    g_c = E_c, not its root). With D = diag(g) and S_i the pruned columns of row i:

        Δb_i = −(1/s) · ((U_i ⊙ (1 − M_i) ⊙ g) Aᵀ) · (κ A D Aᵀ + (1 − κ) A_{S_i} D_{S_i} A_{S_i}ᵀ + λ I)⁻¹

    i.e. shrink the pruned entries of U inside A's row space, kept entries penalised with weight κ.
    κ = 1 gives one shared r×r system for all rows. Kept for comparison (algorithm.md §4).
    """
    _check_shapes(W, A, B, keep, scale)
    dtype = _work_dtype(W, A, B, act_energy)
    w, a, b, g = W.to(dtype), A.to(dtype), B.to(dtype), act_energy.to(dtype)
    pruned_mask = (~keep).to(dtype)
    r, in_f = a.shape
    eye = torch.eye(r, dtype=dtype, device=w.device)
    shared = keep_weight * ((a * g) @ a.T) + reg * eye  # κ A D Aᵀ + λ I
    delta = torch.empty_like(b)
    step = _row_chunk(w.shape[0], r, in_f)
    for start in range(0, w.shape[0], step):
        rows = slice(start, start + step)
        rhs = (((w[rows] + scale * (b[rows] @ a)) * pruned_mask[rows]) * g) @ a.T  # chunk × r
        if keep_weight == 1.0:
            delta[rows] = -torch.linalg.solve(shared, rhs.T).T / scale
            continue
        weighted = a[None] * (g * pruned_mask[rows])[:, None, :]  # A_{S_i} D_{S_i}, chunk × r × in
        system = shared + (1.0 - keep_weight) * (weighted @ a.T)
        delta[rows] = -torch.linalg.solve(system, rhs.unsqueeze(-1)).squeeze(-1) / scale
    return (b + delta).to(B.dtype)
