"""Issue 19: with `stage3_module_granularity_threshold` set so that ZeRO-3 fetches each decoder block as one leaf,
training steps, a prune event and the step after it give what the per-module default gives (the same losses,
the same zeros, weights within 1e-4 relative), on 1 and on 2 CPU ranks. On 1 rank the event's held block pass used to read a 1-element placeholder on its second micro-batch
(DeepSpeed releases a leaf's parameters with free_data=False, replacing the data of parameters another holder keeps);
runtime/zero3.gathered_for_pass now makes the block an ordinary module for the pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from tests.event_compare import assert_same_weights
from tests.fixtures import run_yaml
from tests.launch import deepspeed_cpu

REPO = Path(__file__).resolve().parents[1]


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=256,
    )  # fmt: skip

BLOCKS = [f"base_model.model.model.layers.{i}" for i in range(3)]


@pytest.mark.distributed
@pytest.mark.parametrize("ranks", [1, 2])
def test_decoder_blocks_as_zero3_leaves_change_nothing(tmp_path, ranks):
    config_dir = tmp_path / "config"
    llama_config().save_pretrained(config_dir)
    runs = {}
    for threshold in (0, 1600):  # 1600: above a block's parameters per module, below the whole model's
        out = tmp_path / f"t{threshold}.json"
        args = ["tests/workers/zero3_granularity.py", "--config-dir", str(config_dir), "--threshold", str(threshold)]
        deepspeed_cpu([*args, "--out", str(out)], ranks=ranks)
        runs[threshold] = (json.loads(out.read_text()), torch.load(out.with_suffix(".pt")))
    (plain, plain_weights), (leaves, leaf_weights) = runs[0], runs[1600]
    assert plain["leaves"] == [] and leaves["leaves"] == BLOCKS
    assert leaves["losses"] == plain["losses"] and len(plain["losses"]) == 4
    assert leaves["scalars"]["sparsity/q"] == plain["scalars"]["sparsity/q"] == 0.5
    # the same zeros; weights within 1e-4 relative (2 ranks measured 1.0e-5: the leaf fetches reorder float32 sums)
    assert_same_weights(plain_weights, leaf_weights, f"{ranks} ranks", tolerance=1e-4)


@pytest.mark.distributed
def test_a_threshold_that_makes_another_leaf_is_one_line_on_every_rank(tmp_path):
    """A threshold above the whole model's granularity makes the model itself the leaf: the embedding and blocks an
    event calls one by one would find their weights not gathered. Refused with one line naming the module and the
    range, on both ranks, before any step."""
    raw = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    raw["zero_optimization"]["stage3_module_granularity_threshold"] = 10**9
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(raw))
    config = run_yaml(tmp_path, deepspeed=str(ds), train={"max_steps": 2})
    proc = deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config)], ranks=2, check=False)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("exert-ds: error:")]
    assert proc.returncode != 0 and len(lines) == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "makes the whole model a ZeRO-3 leaf module" in lines[0] and "only they may be leaves" in lines[0]
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))
