"""prune.allocation owl through the trainer on 2 ranks (issue 20 d): with masked recovery after the final event, the
exported expert keeps exactly ⌊s_l·in⌋ zeros in every row of block l (s_l the allocation the checkpoint recorded and
the log printed, also the expert's per-block promise), and a run resumed after the first event reuses the recorded
allocation (it measures none) and writes checkpoints bit-identical to the uninterrupted run's; 1 rank gives the same
allocation, masks and weights (1e-5) after each event and at the end. (2 ranks against 1 for the event itself:
test_zero3_event.py's every-registered-scorer test, owl cases included.)"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exert_ds.storage.expert import expert_tensors
from tests.event_compare import OWL_TEST_THRESHOLD
from tests.fixtures import save_tiny_model_dir
from tests.launch import deepspeed_cpu
from tests.test_checkpoint import assert_same_checkpoints, fresh_checkpoints, train_args
from tests.test_recovery_distributed import recovery_yaml
from tests.test_train import loss_lines, pruned_matrices

pytestmark = pytest.mark.distributed


def owl_config(tmp: Path) -> Path:
    prune = {"sparsity": 0.5, "every_steps": 2, "allocation": "owl", "owl_threshold": OWL_TEST_THRESHOLD}
    config = recovery_yaml(
        tmp,
        prune={**prune, "recovery_steps": 2},
        train={"max_steps": 4, "save_every_steps": 1, "keep_checkpoints": 20, "save_event_experts": True},
    )
    save_tiny_model_dir(tmp / "model", layers=3)  # 3 blocks: the middle one's sparsity depends on the ratios
    return config


def assert_same_masks_and_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        if name.endswith("proj.weight"):
            assert torch.equal(got[name] == 0, w == 0), name
            assert float((got[name] - w).norm() / w.norm()) <= 1e-5, name


def test_owl_training_keeps_each_blocks_zeros_and_resumes_with_the_same_allocation(tmp_path):
    config = owl_config(tmp_path)
    first = deepspeed_cpu(train_args(config), ranks=2).stdout
    measured = "prune event 0: OWL allocation measured, block sparsities at the target: "
    assert measured in first and "OWL allocation measured" not in first.split(measured)[1]
    root = tmp_path / "run" / "checkpoints"
    position = json.loads((root / "step-00000002-event-001" / "manifest.json").read_text())["position"]
    allocation = position["allocation"]
    assert len(allocation) == 3 and len(set(allocation)) == 3
    assert sum(allocation) / 3 == pytest.approx(0.5, abs=1e-12)
    assert first.split(measured)[1].split("\n")[0] == ", ".join(f"{s:.4f}" for s in allocation)
    shown = subprocess.run(
        [sys.executable, "-m", "exert_ds", "inspect", str(root / "step-00000002-event-001")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "OWL block sparsities at the target: " + ", ".join(f"{s:.4f}" for s in allocation) in shown
    manifest = json.loads((tmp_path / "run" / "expert" / "expert_manifest.json").read_text())
    assert manifest["promise"]["blocks"] == allocation
    for name, w in pruned_matrices(load_file(tmp_path / "run" / "final" / "model.safetensors")).items():
        block = int(re.search(r"layers\.(\d+)\.", name).group(1))
        assert ((w == 0).sum(1) == math.floor(allocation[block] * w.shape[1])).all(), name
    # resumed after the first event: the second event uses the recorded allocation, not one measured anew
    reference = tmp_path / "reference"
    shutil.copytree(root, reference)
    fresh_checkpoints(reference, root, "step-00000002-event-001")
    resumed = deepspeed_cpu(train_args(config, "--resume", "auto"), ranks=2).stdout
    assert "OWL allocation measured" not in resumed
    assert "OWL allocation restored from the checkpoint: " + ", ".join(f"{s:.4f}" for s in allocation) in resumed
    assert loss_lines(resumed) == loss_lines(first)[2:]
    later = sorted(p.name for p in reference.glob("step-*") if p.name > "step-00000002-event-001")
    assert "step-00000004-event-002" in later
    assert_same_checkpoints(reference, root, later)
    # 1 rank: the same allocation, masks and weights (the same global batches: recovery_yaml fixes them)
    (tmp_path / "one").mkdir()
    one = owl_config(tmp_path / "one")
    deepspeed_cpu(train_args(one), ranks=1)
    root_one = tmp_path / "one" / "run" / "checkpoints"
    position_one = json.loads((root_one / "step-00000002-event-001" / "manifest.json").read_text())["position"]
    assert position_one["allocation"] == pytest.approx(allocation, abs=1e-12)
    final = "run/final/model.safetensors"
    assert_same_masks_and_close(load_file(tmp_path / "one" / final), load_file(tmp_path / final))
    for event in ("event-0", "event-1"):
        got = dict(expert_tensors(tmp_path / "one" / "run" / "event_experts" / event))
        assert_same_masks_and_close(got, dict(expert_tensors(tmp_path / "run" / "event_experts" / event)))
