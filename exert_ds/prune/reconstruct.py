"""`prune.reconstruct: obs` (algorithm.md §8 a): once the mask is chosen, the kept entries of each row take the
optimal-brain-surgeon update on the all-reduced H, so that they absorb what the pruned entries carried; PBS then
moves into the adapter what they could not.

The update is SparseGPT's column-blocked elimination with the mask fixed (sparsegpt.obs_reconstruct). Rows are
independent given H, so each process updates the whole rows it owns. The sequential, left-to-right elimination is
not the per-row joint optimum, so each row keeps the update only where it lowers that row's calibration
reconstruction error `d H dᵀ` (d = new row − U row) below masking alone: the option can never make a layer worse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from exert_ds.prune.scorers import SparseGPT
from exert_ds.prune.sparsegpt import obs_reconstruct


def reconstruct_rows(u_rows: Tensor, keep_rows: Tensor, hessian: Tensor) -> tuple[Tensor, float, float]:
    """u_rows, keep_rows: (rows, in) whole rows of the effective weight U and their masks (True = keep); hessian:
    (in, in) H = XᵀX over every calibration token. Returns (new_rows, error_masked, error_after): new_rows
    (rows, in) in u_rows' dtype, exactly 0 where not kept; the errors Σ_rows d H dᵀ of masking alone (d = −(1−M)⊙U)
    and of the returned rows, in H's units (squared activations × squared weights), float64 sums."""
    obs = obs_reconstruct(u_rows, hessian, keep_rows, SparseGPT.blocksize, SparseGPT.percdamp)  # (rows, in)
    h = hessian.to(torch.float32 if hessian.dtype != torch.float64 else torch.float64)
    u = u_rows.to(h.dtype)
    masked_d = -u * ~keep_rows  # (rows, in)
    obs_d = obs.to(h.dtype) - u  # (rows, in)
    masked_err = ((masked_d @ h) * masked_d).sum(-1)  # (rows,)
    obs_err = ((obs_d @ h) * obs_d).sum(-1)  # (rows,)
    better = obs_err <= masked_err  # (rows,)
    new_rows = torch.where(better[:, None], obs, u_rows * keep_rows)  # (rows, in)
    after = torch.where(better, obs_err, masked_err)
    return new_rows, float(masked_err.double().sum()), float(after.double().sum())
