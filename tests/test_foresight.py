"""ForeSight scores and masks against a plain float64 re-derivation of algorithm.md §1 and §3."""

import math

import pytest
import torch

from exert_ds.prune.foresight import ROLES, foresight_scores, row_mask

# (hidden, heads, kv_heads, head_dim, ffn): GQA; odd sizes; head_dim ≠ hidden/heads (Qwen3-style)
GEOMETRIES = [(24, 6, 2, 4, 40), (18, 6, 3, 3, 35), (18, 4, 2, 5, 29), (16, 4, 4, 4, 24)]


def random_block(hidden, heads, kv_heads, d, ffn, gen):
    shapes = {
        "q": (heads * d, hidden),
        "k": (kv_heads * d, hidden),
        "v": (kv_heads * d, hidden),
        "o": (hidden, heads * d),
        "gate": (ffn, hidden),
        "up": (ffn, hidden),
        "down": (hidden, ffn),
    }
    weights = {r: torch.randn(s, generator=gen, dtype=torch.float64) for r, s in shapes.items()}
    energy = {r: torch.rand(s[1], generator=gen, dtype=torch.float64) * 3 for r, s in shapes.items()}
    return weights, energy


def reference_factor(role, w, heads, kv_heads, d):
    """The companion table of algorithm.md §1, element by element, with explicit loops."""
    out_f, in_f = w[role].shape
    group = heads // kv_heads
    f = torch.empty(out_f, in_f, dtype=torch.float64)
    for row in range(out_f):
        for c in range(in_f):
            if role == "q":
                g = (row // d) // group
                f[row, c] = w["k"][g * d : (g + 1) * d, c].norm()
            elif role == "k":
                g = row // d
                sq = [w["q"][h * d : (h + 1) * d, c].norm() ** 2 for h in range(g * group, (g + 1) * group)]
                f[row, c] = math.sqrt(sum(sq) / group)
            elif role == "v":
                g, e = row // d, row % d
                sq = [w["o"][:, h * d + e].norm() ** 2 for h in range(g * group, (g + 1) * group)]
                f[row, c] = math.sqrt(sum(sq) / group)
            elif role == "o":
                f[row, c] = (w["gate"][:, row].norm() + w["up"][:, row].norm()) / 2
            elif role in ("gate", "up"):
                f[row, c] = w["down"][c, :].norm()
            else:
                f[row, c] = 1.0
    return f


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_foresight_scores_match_table(geom):
    hidden, heads, kv_heads, d, ffn = geom
    gen = torch.Generator().manual_seed(sum(geom))
    weights, energy = random_block(hidden, heads, kv_heads, d, ffn, gen)
    scores = foresight_scores(weights, energy, heads, kv_heads)
    for role in ROLES:
        expected = (
            weights[role].abs() * energy[role].sqrt()[None, :] * reference_factor(role, weights, heads, kv_heads, d)
        )
        torch.testing.assert_close(scores[role], expected, rtol=1e-12, atol=1e-12, msg=f"role {role}")


def test_foresight_scores_float32_inputs_give_float32():
    gen = torch.Generator().manual_seed(1)
    weights, energy = random_block(24, 6, 2, 4, 40, gen)
    scores = foresight_scores({r: w.float() for r, w in weights.items()}, energy, 6, 2)
    assert all(s.dtype == torch.float32 for s in scores.values())


def test_foresight_bad_geometry_and_missing_role():
    gen = torch.Generator().manual_seed(2)
    weights, energy = random_block(24, 6, 2, 4, 40, gen)
    with pytest.raises(ValueError, match="num_kv_heads"):
        foresight_scores(weights, energy, 6, 4)
    del weights["down"]
    with pytest.raises(ValueError, match="missing"):
        foresight_scores(weights, energy, 6, 2)


@pytest.mark.parametrize("sparsity,cols", [(0.5, 16), (0.4, 37), (0.0, 9), (0.99, 13), (0.3, 1)])
def test_row_mask_prunes_floor_lowest(sparsity, cols):
    gen = torch.Generator().manual_seed(cols)
    scores = torch.rand(11, cols, generator=gen)
    keep = row_mask(scores, sparsity)
    k = math.floor(sparsity * cols)
    assert ((~keep).sum(1) == k).all()
    for row in range(scores.shape[0]):
        pruned = scores[row][~keep[row]]
        kept = scores[row][keep[row]]
        if k and kept.numel():
            assert pruned.max() <= kept.min()


def test_row_mask_ties_prune_lower_column_first():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 0.5]])
    keep = row_mask(scores, 0.5)
    assert keep.tolist() == [[False, False, True, True], [True, False, True, False]]


def test_row_mask_n_m():
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 24, generator=gen)
    keep = row_mask(scores, 0.0, n=2, m=4)
    groups = keep.view(5, 6, 4)
    assert ((~groups).sum(-1) == 2).all()
    for r in range(5):
        for g in range(6):
            s = scores[r, g * 4 : (g + 1) * 4]
            assert s[~groups[r, g]].max() <= s[groups[r, g]].min()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 1.0}, r"must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"must be in \[0, 1\)"),
        ({"sparsity": 0, "n": 4, "m": 4}, "0 < n < m"),
        ({"sparsity": 0, "n": 2, "m": 5}, "does not divide"),
    ],
)
def test_row_mask_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        row_mask(torch.rand(3, 8), **kwargs)


def test_vectorised_oracle_agrees_with_loops():
    """tests/reference.py's vectorised oracle (used by the event tests) equals the element-wise loops."""
    from tests.reference import foresight_reference

    hidden, heads, kv_heads, d, ffn = GEOMETRIES[2]
    weights, energy = random_block(hidden, heads, kv_heads, d, ffn, torch.Generator().manual_seed(7))
    got = foresight_reference(weights, energy, heads, kv_heads)
    for role in ROLES:
        expected = (
            weights[role].abs() * energy[role].sqrt()[None, :] * reference_factor(role, weights, heads, kv_heads, d)
        )
        torch.testing.assert_close(got[role], expected, rtol=1e-12, atol=1e-12)
