"""eval/bench_export_size.py on CPU: the sizes it reports are the files' sizes, and for a 2:4 bf16 expert the
compressed-tensors export is what the format's layout says (half the values, 1 bit per weight, the shape)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))

pytest.importorskip("compressed_tensors")


def test_two_four_sizes_against_the_layout(tmp_path):
    import bench_export_size

    config = json.loads((REPO / "eval/configs/tiny_llama_cpu/config.json").read_text())
    out = tmp_path / "size.json"
    args = [
        "--config-dir",
        str(REPO / "eval/configs/tiny_llama_cpu"),
        "--n-m",
        "2:4",
        "--work-dir",
        str(tmp_path / "w"),
    ]
    got = bench_export_size.main([*args, "--out", str(out)])
    assert json.loads(out.read_text()) == got
    h, f, heads, kv, layers = (
        config[k]
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    )
    d = config["head_dim"]
    shapes = [(heads * d, h), (kv * d, h), (kv * d, h), (h, heads * d), (f, h), (f, h), (h, f)]  # (rows, cols)
    dense_proj = sum(2 * r * c for r, c in shapes) * layers
    sparse_proj = sum(r * c + r * -(-c // 8) + 16 for r, c in shapes) * layers  # bf16 halves + bitmask + shape
    other = 2 * (2 * config["vocab_size"] * h + (2 * layers + 1) * h)  # embed, lm_head, norms
    # what is left is each file's JSON header
    header_dense = got["dense"]["safetensors_bytes"] - dense_proj - other
    header_sparse = got["compressed_tensors"]["safetensors_bytes"] - sparse_proj - other
    assert 0 < header_dense < 20_000 and 0 < header_sparse < 40_000
    assert got["compressed_tensors"]["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert got["promise"] == {"sparsity": 0.5, "n": 2, "m": 4}
    assert (tmp_path / "w" / "dense" / "model.safetensors").stat().st_size == got["dense"]["safetensors_bytes"]
