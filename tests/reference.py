"""Oracles written from algorithm.md without calling exert_ds: plain float64 torch, one row at a time where
that is the clearest statement of the formula."""

from __future__ import annotations

import copy

import torch

ROLE_PATHS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def foresight_reference(U: dict, E: dict, heads: int, kv_heads: int) -> dict:
    """S = |U| · sqrt(E) · F with F from the table of algorithm.md §1, via reshapes and norms."""
    d = U["q"].shape[0] // heads
    g = heads // kv_heads
    hidden = U["o"].shape[0]
    k_norm = U["k"].reshape(kv_heads, d, -1).norm(dim=1)  # (Hkv, in)
    q_norm_sq = U["q"].reshape(heads, d, -1).norm(dim=1) ** 2  # (H, in)
    o_col_sq = U["o"].norm(dim=0) ** 2  # (H·d,)
    f = {
        "q": k_norm.repeat_interleave(g, 0).repeat_interleave(d, 0),
        "k": (q_norm_sq.reshape(kv_heads, g, -1).mean(1).sqrt()).repeat_interleave(d, 0),
        "v": o_col_sq.reshape(kv_heads, g, d).mean(1).sqrt().reshape(-1, 1).expand_as(U["v"]),
        "o": ((U["gate"].norm(dim=0) + U["up"].norm(dim=0)) / 2).reshape(hidden, 1).expand_as(U["o"]),
        "gate": U["down"].norm(dim=1).reshape(1, -1).expand_as(U["gate"]),
        "up": U["down"].norm(dim=1).reshape(1, -1).expand_as(U["up"]),
        "down": torch.ones_like(U["down"]),
    }
    return {r: U[r].abs() * E[r].sqrt()[None, :] * f[r] for r in U}


def lowest_per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(sparsity * scores.shape[1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    for i in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda c: (float(scores[i, c]), c))
        keep[i, order[:k]] = False
    return keep


def pbs_rows_lstsq(U, A, keep, X, scale, reg=1e-2, start=None):
    """ΔB row by row: min_y ‖X Â_iᵀ y − X p_iᵀ‖² + λ'_i‖y‖², y = s·Δb_iᵀ, λ'_i = reg·mean diag(Â_i XᵀX Â_iᵀ),
    p_i = (1 − M_i) ⊙ U_i, or U_i − start_i when the merge starts from reconstructed weights `start`."""
    H = X.T @ X
    delta = torch.zeros(U.shape[0], A.shape[0], dtype=U.dtype)
    for i in range(U.shape[0]):
        m = keep[i].to(U.dtype)
        a_hat = A * m
        lam = reg * torch.diagonal(a_hat @ H @ a_hat.T).mean()
        design = torch.cat([X @ a_hat.T, lam.sqrt() * torch.eye(A.shape[0], dtype=U.dtype)])
        p = (1 - m) * U[i] if start is None else U[i] - start[i]
        target = torch.cat([X @ p, torch.zeros(A.shape[0], dtype=U.dtype)])
        delta[i] = torch.linalg.lstsq(design, target[:, None]).solution[:, 0] / scale
    return delta


def obs_rows_reference(U: torch.Tensor, keep: torch.Tensor, H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """prune.reconstruct obs, row by row in float64: eliminate the pruned columns left to right, each one's error
    spread over the later columns by the upper Cholesky factor of (H + λI)⁻¹ (λ = percdamp · mean diag H; dead
    inputs H_cc = 0 get H_cc = 1 first); keep a row's update only if it lowers d H dᵀ below masking alone."""
    H = H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    Hd = H + percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Uc = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    out = torch.zeros_like(U, dtype=torch.float64)
    for i in range(U.shape[0]):
        w = U[i].double().clone()
        for j in range(U.shape[1]):
            if not keep[i, j]:
                w[j:] = w[j:] - w[j] / Uc[j, j] * Uc[j, j:]
                w[j] = 0.0
        masked = U[i].double() * keep[i]
        err = [float(d @ H0 @ d) for d, H0 in ((w - U[i].double(), H), (masked - U[i].double(), H))]
        out[i] = w if err[0] <= err[1] else masked
    return out


@torch.no_grad()
def sequential_event(
    peft_model, ids, sparsity: float, scorer: str = "foresight", pbs: bool = True, reconstruct: bool = False
):
    """One prune event, re-implemented: a full forward per block to record that block's linear inputs
    (earlier blocks already pruned), then scores, masks, (the OBS reconstruction of the kept weights), PBS, merge
    and mask, B = 0. Returns the model copy and role masks per block."""
    model = copy.deepcopy(peft_model).eval()
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    layers = model.get_base_model().model.layers
    masks = []
    for layer in layers:
        mods = {r: layer.get_submodule(p) for r, p in ROLE_PATHS.items()}
        seen = {r: [] for r in mods}
        hooks = [
            m.register_forward_hook(lambda mod, a, o, r=r, seen=seen: seen[r].append(a[0].reshape(-1, a[0].shape[-1])))
            for r, m in mods.items()
        ]
        model(input_ids=ids, use_cache=False)
        for h in hooks:
            h.remove()
        X = {r: torch.cat(v).double() for r, v in seen.items()}
        parts = {
            r: (m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"])
            for r, m in mods.items()
        }
        U = {r: (w + s * b @ a).double() for r, (w, a, b, s) in parts.items()}
        E = {r: X[r].square().sum(0) for r in X}
        if scorer == "foresight":
            scores = foresight_reference(U, E, heads, kv_heads)
        elif scorer == "wanda":
            scores = {r: U[r].abs() * E[r].sqrt()[None, :] for r in U}
        else:
            scores = {r: U[r].abs() for r in U}
        block_masks = {}
        for r, (w, a, b, s) in parts.items():
            keep = lowest_per_row_mask(scores[r], sparsity)
            start = obs_rows_reference(U[r], keep, X[r].T @ X[r]) if reconstruct else U[r] * keep
            if pbs:
                delta = pbs_rows_lstsq(U[r], a.double(), keep, X[r], s, start=start)
            else:
                delta = torch.zeros_like(b.double())
            w.copy_((start + keep * (s * delta @ a.double())).to(w.dtype))
            b.zero_()
            block_masks[r] = keep
        masks.append(block_masks)
    return model, masks
