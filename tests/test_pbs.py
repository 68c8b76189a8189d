"""Partial Brain Surgeon against a per-row least-squares solve written from the objective (algorithm.md §4)."""

import pytest
import torch

from exert_ds.prune.foresight import row_mask
from exert_ds.prune.pbs import (
    float32_matmul_precision,
    partial_brain_surgeon,
    partial_brain_surgeon_reference,
    partial_brain_surgeon_with_errors,
)


def layer(out_f, in_f, r, tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    f64 = {"generator": gen, "dtype": torch.float64}
    W = torch.randn(out_f, in_f, **f64)
    A = torch.randn(r, in_f, **f64) / in_f**0.5
    B = torch.randn(out_f, r, **f64) * 0.1
    X = torch.randn(tokens, in_f, **f64) * torch.rand(in_f, **f64) * 2  # uneven channel energies
    scale = 2.0
    keep = row_mask(torch.rand(out_f, in_f, generator=gen), 0.5)
    return W, A, B, scale, keep, X


def lstsq_hessian_rows(W, A, B, scale, keep, X, reg):
    """Row by row: min_y ‖X Â_iᵀ y − X p_iᵀ‖² + λ'_i ‖y‖², y = s·Δb_iᵀ (ridge as an augmented system)."""
    U = W + scale * B @ A
    H = X.T @ X
    delta = torch.empty_like(B)
    for i in range(W.shape[0]):
        m = keep[i].to(W.dtype)
        p = (1 - m) * U[i]
        a_hat = A * m
        lam = reg * torch.diagonal(a_hat @ H @ a_hat.T).mean()
        design = torch.cat([X @ a_hat.T, lam.sqrt() * torch.eye(A.shape[0], dtype=W.dtype)])
        target = torch.cat([X @ p, torch.zeros(A.shape[0], dtype=W.dtype)])
        y = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
        delta[i] = y / scale
    return B + delta


def lstsq_reference_rows(W, A, B, scale, keep, energy, reg, kappa):
    """Row by row: min_y Σ_c w_c (p_c + y·A_c)² + λ‖y‖², w_c = g_c on pruned, κ·g_c on kept columns."""
    U = W + scale * B @ A
    delta = torch.empty_like(B)
    for i in range(W.shape[0]):
        pruned = (~keep[i]).to(W.dtype)
        p = U[i] * pruned
        w = energy * (pruned + kappa * (1 - pruned))
        design = torch.cat([(A * w.sqrt()).T, reg**0.5 * torch.eye(A.shape[0], dtype=W.dtype)])
        target = torch.cat([-(p * w.sqrt()), torch.zeros(A.shape[0], dtype=W.dtype)])
        y = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
        delta[i] = y / scale
    return B + delta


@pytest.mark.parametrize("shape", [(12, 20, 4, 64), (7, 33, 3, 50), (16, 16, 8, 200)])
def test_hessian_mode_matches_per_row_least_squares(shape):
    W, A, B, scale, keep, X = layer(*shape, seed=sum(shape))
    got = partial_brain_surgeon(W, A, B, scale, keep, X.T @ X, reg=1e-2)
    torch.testing.assert_close(got, lstsq_hessian_rows(W, A, B, scale, keep, X, 1e-2), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kappa", [1.0, 0.3])
@pytest.mark.parametrize("shape", [(12, 20, 4, 64), (7, 33, 3, 50)])
def test_reference_mode_matches_per_row_least_squares(shape, kappa):
    W, A, B, scale, keep, X = layer(*shape, seed=sum(shape) + 1)
    energy = X.square().sum(0)
    got = partial_brain_surgeon_reference(W, A, B, scale, keep, energy, reg=1e-6, keep_weight=kappa)
    want = lstsq_reference_rows(W, A, B, scale, keep, energy, 1e-6, kappa)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_hessian_mode_never_increases_reconstruction_error(seed):
    W, A, B, scale, keep, X = layer(24, 40, 6, 80, seed=seed)
    U = W + scale * B @ A

    def error(b):  # ‖(M ⊙ (W + s·B'·A) − U)·Xᵀ‖², computed directly from the calibration inputs
        return float(((keep * (W + scale * b @ A) - U) @ X.T).square().sum())

    new_b = partial_brain_surgeon(W.float(), A.float(), B.float(), scale, keep, (X.T @ X).float())
    assert error(new_b.double()) <= error(B)
    # the errors PBS reports (from its own products) are those direct computations
    got_b, before, after = partial_brain_surgeon_with_errors(W, A, B, scale, keep, X.T @ X)
    assert before == pytest.approx(error(B), rel=1e-9)
    assert after == pytest.approx(error(got_b), rel=1e-9)


def test_nothing_pruned_means_no_update_and_float32_stays_float32():
    W, A, B, scale, _, X = layer(10, 12, 3, 40, seed=9)
    keep = torch.ones_like(W, dtype=torch.bool)
    got = partial_brain_surgeon(W.float(), A.float(), B.float(), scale, keep, (X.T @ X).float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, B.float())


def test_shape_errors_are_clear():
    W, A, B, scale, keep, X = layer(10, 12, 3, 40, seed=4)
    with pytest.raises(ValueError, match="shapes disagree"):
        partial_brain_surgeon(W, A.T, B, scale, keep, X.T @ X)


def test_matmul_precision_is_restored_after_the_block_even_on_error():
    before = torch.get_float32_matmul_precision()
    with pytest.raises(RuntimeError, match="inside"):
        with float32_matmul_precision("high"):
            assert torch.get_float32_matmul_precision() == "high"
            raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == before


def test_pbs_from_a_reconstructed_start_is_the_least_squares_optimum_and_never_worse():
    """prune.reconstruct: obs then PBS: p_i = U_i − start_i, Δb_i the ridge least-squares optimum of
    ‖X (p_i − s·Δb·Â_i)ᵀ‖² (solved row by row here), and the merge reconstructs no worse than `start`."""
    from exert_ds.prune.sparsegpt import obs_reconstruct

    W, A, B, scale, keep, X = layer(12, 40, 4, 200, seed=11)
    U = W + scale * B @ A
    H = X.T @ X
    start = obs_reconstruct(U, H, keep, blocksize=16)
    new_b, before, after = partial_brain_surgeon_with_errors(W, A, B, scale, keep, H, 1e-2, start_weight=start)
    for i in range(W.shape[0]):
        m = keep[i].to(W.dtype)
        a_hat = A * m
        lam = 1e-2 * torch.diagonal(a_hat @ H @ a_hat.T).mean()
        design = torch.cat([X @ a_hat.T, lam.sqrt() * torch.eye(A.shape[0], dtype=W.dtype)])
        target = torch.cat([X @ (U[i] - start[i]), torch.zeros(A.shape[0], dtype=W.dtype)])
        y = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
        assert torch.allclose((new_b - B)[i], y / scale, rtol=1e-8, atol=1e-10)
    merged = start + (scale * (new_b - B) @ A) * keep
    assert before == pytest.approx(float(((X @ (U - start).T) ** 2).sum()), rel=1e-9)
    assert after == pytest.approx(float(((X @ (U - merged).T) ** 2).sum()), rel=1e-9)
    assert after <= before
    masked_only = float(((X @ (U * ~keep).T) ** 2).sum())
    assert before < masked_only  # the reconstruction itself already beats masking
