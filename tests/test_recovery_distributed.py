"""prune.recovery_steps through the trainer under the deepspeed launcher (issue 20 c): 2 ranks against 1 rank (the
same masks, weights within 1e-5 relative), exactly ⌊p·in⌋ zeros per row in the exported expert (the masked merge
never writes a pruned entry), a run resumed inside the recovery bit-identical to the uninterrupted one, and the
one-shot baseline with the same recovery (LoRA → SparseGPT → masked recovery), 2 ranks against 1."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures import run_yaml
from tests.launch import REPO, deepspeed_cpu
from tests.test_checkpoint import assert_same_checkpoints, fresh_checkpoints, train_args
from tests.test_train import loss_lines, pruned_matrices

pytestmark = pytest.mark.distributed


def fixed_batch_ds_config(tmp: Path) -> Path:
    """train_batch_size 4 with micro-batch 2: 1 rank accumulates 2 micro-batches, 2 ranks 1 each (same batches)."""
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds.pop("gradient_accumulation_steps")
    path = tmp / "ds.json"
    path.write_text(json.dumps({**ds, "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}))
    return path


def recovery_yaml(tmp: Path, **sections) -> Path:
    return run_yaml(
        tmp,
        deepspeed=str(fixed_batch_ds_config(tmp)),
        lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},  # dropout draws differ between 1 and 2 ranks
        **sections,
    )


def assert_exact_zeros_and_close(got: dict, want: dict, sparsity: float) -> None:
    assert len(got) == len(want) == 14
    for name, w in got.items():
        assert ((w == 0).sum(1) == math.floor(sparsity * w.shape[1])).all(), name
        assert torch.equal(w != 0, want[name] != 0), name
        assert float((w - want[name]).norm() / want[name].norm()) <= 1e-5, name


def test_training_with_recovery_two_ranks_equal_one_and_resume_inside_it(tmp_path):
    runs, outputs = {}, {}
    for ranks in (1, 2):
        tmp = tmp_path / f"r{ranks}"
        tmp.mkdir()
        config = recovery_yaml(
            tmp,
            prune={"sparsity": 0.5, "every_steps": 2, "recovery_steps": 3},
            train={"max_steps": 4, "save_every_steps": 1, "keep_checkpoints": 20},
        )
        outputs[ranks] = deepspeed_cpu(train_args(config), ranks=ranks).stdout
        runs[ranks] = pruned_matrices(load_file(tmp / "run" / "final" / "model.safetensors"))
    assert "prune events before steps [2, 4], then 3 recovery steps" in outputs[2]
    assert len(loss_lines(outputs[2])) == 7  # 4 training steps, then 3 masked ones
    assert_exact_zeros_and_close(runs[2], runs[1], 0.5)
    # the same run without recovery ends at the final event: the recovery kept that event's mask exactly and moved
    # the kept weights
    (tmp_path / "none").mkdir()
    config = recovery_yaml(tmp_path / "none", prune={"sparsity": 0.5, "every_steps": 2}, train={"max_steps": 4})
    assert loss_lines(deepspeed_cpu(train_args(config), ranks=2).stdout) == loss_lines(outputs[2])[:4]
    at_event = pruned_matrices(load_file(tmp_path / "none" / "run" / "final" / "model.safetensors"))
    for name, w in runs[2].items():
        assert torch.equal(w == 0, at_event[name] == 0), name
        assert float((w - at_event[name]).norm() / at_event[name].norm()) > 1e-4, name
    root = tmp_path / "r2" / "run" / "checkpoints"
    names = sorted(p.name for p in root.glob("step-*"))
    assert names[-1] == "step-00000007-event-002", names
    # resumed after the first recovery step: the same losses and bit-identical checkpoints from there on
    reference = tmp_path / "r2" / "reference"
    shutil.copytree(root, reference)
    fresh_checkpoints(reference, root, "step-00000005-event-002")
    resumed = deepspeed_cpu(train_args(tmp_path / "r2" / "run.yaml", "--resume", "auto"), ranks=2).stdout
    assert loss_lines(resumed) == loss_lines(outputs[2])[5:]
    assert_same_checkpoints(reference, root, ["step-00000006-event-002", "step-00000007-event-002"])


def test_one_shot_sparsegpt_with_recovery_two_ranks_equal_one(tmp_path):
    from tests.tiny_models import tiny_lora_model

    runs = {}
    for ranks in (1, 2):
        tmp = tmp_path / f"r{ranks}"
        tmp.mkdir()
        config = recovery_yaml(
            tmp, prune={"scorer": "sparsegpt", "sparsity": 0.4, "recovery_steps": 3}, pbs={"mode": "off"}
        )
        if ranks == 1:
            from transformers import AutoModelForCausalLM

            vocab = AutoModelForCausalLM.from_pretrained(tmp / "model").config.vocab_size
            tiny_lora_model("llama-odd", vocab=vocab, r=4, seed=0).save_pretrained(tmp_path / "adapter")
        args = ["--module", "exert_ds", "prune", "--config", str(config), "--adapter", str(tmp_path / "adapter")]
        out = deepspeed_cpu(args, ranks=ranks).stdout
        assert "prune events before steps [0], then 3 recovery steps" in out and len(loss_lines(out)) == 3
        runs[ranks] = pruned_matrices(load_file(tmp / "run" / "final" / "model.safetensors"))
    assert_exact_zeros_and_close(runs[2], runs[1], 0.4)
