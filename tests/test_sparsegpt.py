"""Tests of exert_ds.prune.sparsegpt against the §8 invariants and a naive float64 OBS reference."""

from __future__ import annotations

import math

import pytest
import torch

from exert_ds.prune.sparsegpt import obs_reconstruct, sparsegpt_prune


def _problem(rows: int, cols: int, seed: int = 0, dtype: torch.dtype = torch.float64, tokens: int = 512):
    """Random W and correlated inputs X with uneven feature scales; H = XᵀX."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mix = (
        torch.eye(cols, dtype=torch.float64)
        + 0.5 * torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    )
    scale = torch.rand(cols, generator=g, dtype=torch.float64) * 2 + 0.1
    X = (torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix) * scale
    return W.to(dtype), (X.T @ X).to(dtype), X


def _recon_error(delta: torch.Tensor, X: torch.Tensor) -> float:
    return float(((delta.double() @ X.T) ** 2).sum())


def _reference(W, H, sparsity=0.0, n=0, m=0, blocksize=None, keep=None, percdamp=0.01):
    """Naive float64 sequential OBS: one row at a time, one column at a time, with U = chol_upper((H + λI)⁻¹).

    Eliminating column j (pruned) moves the row by -w_j / U_jj · U_{j, j:}. If `keep` is None the mask is chosen
    at each block start (k_b lowest w²/U_jj² of the row as updated so far) or each N:M group start.
    """
    W = W.double().clone()
    H = H.double().clone()
    cols = W.shape[1]
    blocksize = blocksize or cols
    Hd = H + percdamp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    d2 = U.diagonal() ** 2
    out = torch.zeros_like(W)
    prune = torch.zeros_like(W, dtype=torch.bool)
    for r in range(W.shape[0]):
        w = W[r].clone()
        for j in range(cols):
            if keep is not None:
                prune[r, j] = not keep[r, j]
            elif n and j % m == 0:
                scores = [(float(w[c] ** 2 / d2[c]), c) for c in range(j, j + m)]
                for _, c in sorted(scores)[:n]:
                    prune[r, c] = True
            elif not n and j % blocksize == 0:
                j2 = min(j + blocksize, cols)
                k = math.floor(sparsity * j2) - math.floor(sparsity * j)
                scores = [(float(w[c] ** 2 / d2[c]), c) for c in range(j, j2)]
                for _, c in sorted(scores)[:k]:
                    prune[r, c] = True
            if prune[r, j]:
                w[j:] = w[j:] - w[j] / U[j, j] * U[j, j:]
                w[j] = 0.0
            out[r, j] = w[j]
    return out, ~prune


def _explicit_obs(W, H, keep, percdamp=0.01):
    """Textbook OBS with the inverse of the Hessian of the not yet eliminated columns, recomputed at every step."""
    W = W.double().clone()
    cols = W.shape[1]
    Hd = H.double() + percdamp * H.double().diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    for j in range(cols):
        Hinv_f = torch.linalg.inv(Hd[j:, j:])
        pr = ~keep[:, j]
        W[pr, j:] -= (W[pr, j] / Hinv_f[0, 0]).unsqueeze(1) * Hinv_f[0].unsqueeze(0)
        W[pr, j] = 0.0
    return W


SHAPES = [(24, 160, 32), (17, 96, 32), (17, 100, 32), (5, 40, 128)]


@pytest.mark.parametrize("rows,cols,blocksize", SHAPES)
@pytest.mark.parametrize("sparsity", [0.5, 0.37, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_row_counts_and_zeros(rows, cols, blocksize, sparsity, dtype):
    W, H, _ = _problem(rows, cols, dtype=dtype)
    new, keep = sparsegpt_prune(W, H, sparsity, blocksize=blocksize)
    assert new.dtype == dtype and keep.dtype == torch.bool and keep.shape == W.shape == new.shape
    assert torch.all((~keep).sum(dim=1) == math.floor(sparsity * cols))
    assert torch.all(new[~keep] == 0)
    assert torch.all(new[keep] != 0)  # continuous random data: kept entries are never exactly zero
    assert torch.isfinite(new).all()


def test_low_precision_dtype_returned():
    W, H, _ = _problem(16, 64, dtype=torch.float32)
    new, keep = sparsegpt_prune(W.to(torch.bfloat16), H, 0.5, blocksize=32)
    assert new.dtype == torch.bfloat16
    assert torch.all((~keep).sum(dim=1) == 32)
    assert torch.all(new[~keep] == 0)


@pytest.mark.parametrize("rows,cols,blocksize", SHAPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4)])
def test_nm_exact_group_counts(rows, cols, blocksize, n, m):
    W, H, _ = _problem(rows, cols)
    new, keep = sparsegpt_prune(W, H, 0.0, n=n, m=m, blocksize=blocksize)
    assert torch.all((~keep).reshape(rows, cols // m, m).sum(dim=2) == n)
    assert torch.all(new[~keep] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsity_zero_is_identity(dtype):
    W, H, _ = _problem(17, 96, dtype=dtype)
    new, keep = sparsegpt_prune(W, H, 0.0, blocksize=32)
    assert keep.all()
    assert torch.allclose(new, W)


def test_dead_inputs_zeroed_and_finite():
    W, H, X = _problem(12, 64)
    X[:, [3, 17, 40]] = 0
    H = X.T @ X
    new, keep = sparsegpt_prune(W, H, 0.5, blocksize=32)
    assert torch.isfinite(new).all()
    assert torch.all(new[:, [3, 17, 40]] == 0)
    assert not keep[:, [3, 17, 40]].any()  # zero weight, zero score: pruned first
    assert torch.all((~keep).sum(dim=1) == 32)
    assert torch.equal(H, X.T @ X)  # the input Hessian is not modified


@pytest.mark.parametrize("rows,cols,blocksize", SHAPES)
@pytest.mark.parametrize("sparsity,nm", [(0.5, (0, 0)), (0.7, (0, 0)), (0.0, (2, 4))])
def test_update_beats_masking_and_magnitude(rows, cols, blocksize, sparsity, nm):
    W, H, X = _problem(rows, cols)
    new, keep = sparsegpt_prune(W, H, sparsity, n=nm[0], m=nm[1], blocksize=blocksize)
    err = _recon_error(new - W, X)
    assert err < _recon_error(W * keep - W, X)
    if nm == (0, 0):
        k = math.floor(sparsity * cols)
        mag_keep = torch.ones_like(keep).scatter_(1, torch.argsort(W.abs(), dim=1, stable=True)[:, :k], False)
    else:
        groups = W.abs().reshape(rows, cols // 4, 4)
        low = torch.argsort(groups, dim=2, stable=True)[..., :2]
        mag_keep = torch.ones_like(groups, dtype=torch.bool).scatter_(2, low, False).reshape(rows, cols)
    assert err < _recon_error(W * mag_keep - W, X)


def test_reference_matches_explicit_obs():
    """Sanity check of the test reference itself: the Cholesky row form equals explicit-inverse OBS."""
    W, H, _ = _problem(6, 20, seed=3)
    keep = torch.rand(6, 20, generator=torch.Generator().manual_seed(4)) > 0.5
    ref, _ = _reference(W, H, keep=keep)
    assert torch.allclose(ref, _explicit_obs(W, H, keep), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("rows,cols,sparsity", [(17, 96, 0.5), (24, 160, 0.37)])
def test_matches_reference_single_block(rows, cols, sparsity):
    W, H, _ = _problem(rows, cols, seed=1)
    new, keep = sparsegpt_prune(W, H, sparsity, blocksize=cols)
    ref, ref_keep = _reference(W, H, keep=keep)
    assert torch.equal(ref_keep, keep)
    assert torch.allclose(new, ref, rtol=1e-6, atol=1e-6 * float(W.abs().max()))
    # the single-block mask itself: per row, the k lowest w²/U_jj² of the original weights
    _, adaptive_keep = _reference(W, H, sparsity=sparsity)
    assert torch.equal(adaptive_keep, keep)


@pytest.mark.parametrize("sparsity,nm", [(0.37, (0, 0)), (0.0, (2, 4))])
def test_matches_reference_blocked_adaptive(sparsity, nm):
    W, H, _ = _problem(17, 100, seed=2)
    new, keep = sparsegpt_prune(W, H, sparsity, n=nm[0], m=nm[1], blocksize=32)
    ref, ref_keep = _reference(W, H, sparsity=sparsity, n=nm[0], m=nm[1], blocksize=32)
    assert torch.equal(ref_keep, keep)
    assert torch.allclose(new, ref, rtol=1e-6, atol=1e-6 * float(W.abs().max()))


def test_input_not_modified():
    W, H, _ = _problem(8, 64)
    W0, H0 = W.clone(), H.clone()
    sparsegpt_prune(W, H, 0.5, blocksize=32)
    assert torch.equal(W, W0) and torch.equal(H, H0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"sparsity": float("nan")},
        {"sparsity": 0.0, "n": 4, "m": 4},
        {"sparsity": 0.0, "n": 0, "m": 4},
        {"sparsity": 0.0, "n": 2, "m": 7},  # 7 divides neither in=96 nor blocksize=32
        {"sparsity": 0.0, "n": 1, "m": 3},  # 3 divides in=96 but not blocksize=32
        {"sparsity": 0.5, "blocksize": 0},
    ],
)
def test_bad_input_raises(kwargs):
    W, H, _ = _problem(4, 96)
    kwargs = {"blocksize": 32, **kwargs}
    with pytest.raises(ValueError):
        sparsegpt_prune(W, H, **kwargs)


def test_m_not_dividing_in_raises():
    W, H, _ = _problem(4, 90)
    with pytest.raises(ValueError):
        sparsegpt_prune(W, H, 0.0, n=2, m=4, blocksize=32)


def _random_row_keep(rows: int, cols: int, sparsity: float, seed: int) -> torch.Tensor:
    k = math.floor(sparsity * cols)
    order = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)).argsort(dim=1)
    return torch.ones(rows, cols, dtype=torch.bool).scatter_(1, order[:, :k], False)


@pytest.mark.parametrize("rows,cols,blocksize", SHAPES)
def test_obs_reconstruct_matches_reference_for_a_fixed_mask(rows, cols, blocksize):
    """prune.reconstruct: obs — the fixed-mask elimination equals the float64 row-by-row OBS reference, whatever the
    block size, keeps exactly the mask's zeros, and reconstructs better than masking alone."""
    W, H, X = _problem(rows, cols, seed=5)
    keep = _random_row_keep(rows, cols, 0.5, seed=6)
    new = obs_reconstruct(W, H, keep, blocksize=blocksize)
    ref, ref_keep = _reference(W, H, keep=keep)
    assert torch.equal(ref_keep, keep)
    assert torch.allclose(new, ref, rtol=1e-9, atol=1e-9 * float(W.abs().max()))
    assert torch.equal(new == 0, ~keep)
    assert _recon_error(new - W, X) < _recon_error(W * keep - W, X)


def test_obs_reconstruct_of_sparsegpt_mask_is_sparsegpt():
    """With SparseGPT's own mask the fixed-mask elimination reproduces SparseGPT's weights (float32)."""
    W, H, _ = _problem(17, 100, seed=7, dtype=torch.float32)
    new, keep = sparsegpt_prune(W, H, 0.5, blocksize=32)
    assert torch.allclose(obs_reconstruct(W, H, keep, blocksize=32), new, rtol=1e-5, atol=1e-6)


def test_obs_reconstruct_rows_are_independent_and_dead_inputs_kept():
    W, H, X = _problem(12, 64, seed=8)
    X[:, [3, 40]] = 0
    H = X.T @ X
    keep = _random_row_keep(12, 64, 0.5, seed=9)
    new = obs_reconstruct(W, H, keep, blocksize=16)
    assert torch.allclose(obs_reconstruct(W[5:9], H, keep[5:9], blocksize=16), new[5:9], rtol=0, atol=1e-12)
    dead_kept = keep[:, [3, 40]]
    assert torch.equal(new[:, [3, 40]][dead_kept], W[:, [3, 40]][dead_kept])  # no token sees them: untouched
    assert torch.equal(new == 0, ~keep)
    with pytest.raises(ValueError):
        obs_reconstruct(W, H, keep[:, :10])
