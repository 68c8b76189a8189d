"""train.adapter_dtype "model" (issue 19's memory lever, the default) through the whole trainer on a bfloat16 model
with DeepSpeed's bf16 optimizer: LoRA held in bfloat16 with float32 masters (the parameter dtype itself is checked in
test_event.py), two prune events (they read A and B in float32), a checkpoint and the sparse expert, on 2 CPU ranks
against 1 rank (the same sparsity, losses within bf16 rounding)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fixtures import run_yaml
from tests.launch import deepspeed_cpu
from tests.test_train import loss_lines

REPO = Path(__file__).resolve().parents[1]


def bf16_ds_config(tmp: Path) -> Path:
    raw = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    path = tmp / "zero3_cpu_bf16.json"
    path.write_text(json.dumps({**raw, "bf16": {"enabled": True}}))
    return path


@pytest.mark.distributed
def test_bfloat16_adapters_train_prune_and_two_ranks_follow_one(tmp_path):
    runs = {}
    for ranks in (1, 2):
        tmp = tmp_path / f"r{ranks}"
        tmp.mkdir()
        config = run_yaml(
            tmp,
            model={"dtype": "bfloat16"},
            deepspeed=str(bf16_ds_config(tmp)),
            prune={"sparsity": 0.5, "every_steps": 2},
            train={"max_steps": 4, "adapter_dtype": "model"},
        )
        out = deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config)], ranks=ranks).stdout
        runs[ranks] = (tmp / "run", [float(line.split("loss ")[1].split(",")[0]) for line in loss_lines(out)])
    for run, losses in runs.values():
        assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
        summary = json.loads((run / "summary.json").read_text())
        assert all(0.48 < s <= 0.5 for s in summary["measured_sparsity"].values()), summary  # ⌊0.5·in⌋ per row
    sparsity = [json.loads((run / "summary.json").read_text())["measured_sparsity"] for run, _ in runs.values()]
    assert sparsity[0] == sparsity[1]
    torch.testing.assert_close(torch.tensor(runs[2][1]), torch.tensor(runs[1][1]), rtol=2e-2, atol=0)
