"""Sharded sparse checkpoints: exact resume at the same world size, integrity checks (zero3.md)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from exert_ds.checkpoint import pack_sparse, unpack_sparse
from tests.fixtures import run_yaml
from tests.launch import deepspeed_cpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_pack_round_trip_and_size(dtype):
    values = torch.randn(1001).to(dtype)
    values[torch.randperm(1001, generator=torch.Generator().manual_seed(0))[:500]] = 0
    packed = pack_sparse(values)
    assert torch.equal(unpack_sparse(packed), values)
    stored = packed["values"].numel() * packed["values"].element_size() + packed["mask"].numel()
    assert stored <= 0.57 * values.numel() * values.element_size()  # 50% zeros: values + 1 bit per element


def loss_lines(output: str) -> dict[int, str]:
    lines = [line.split("step ", 1)[1] for line in output.splitlines() if "loss " in line and "step " in line]
    return {int(line.split(":")[0]): line.split(", lr")[0] for line in lines}


@pytest.mark.distributed
def test_resume_is_exact_at_the_same_world_size(tmp_path):
    """Resume from the checkpoint after step 3 (before the EMA event at step 4): the later losses and the final
    weights are bit-identical to the uninterrupted run; `latest` and keep-K behave; a damaged file is named."""
    config = run_yaml(
        tmp_path,
        prune={"sparsity": 0.5, "every_steps": 2},
        train={"max_steps": 6, "save_every_steps": 1, "keep_checkpoints": 20},
    )
    whole = deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config)], ranks=2)
    run = tmp_path / "run"
    shutil.copytree(run / "final", tmp_path / "final_whole")
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert (run / "checkpoints" / "latest").read_text() == checkpoints[-1] == "step-00000006-event-003"
    resumed = deepspeed_cpu(
        [
            "--module",
            "exert_ds",
            "train",
            "--config",
            str(config),
            "--resume",
            str(run / "checkpoints" / "step-00000003-event-001"),
            "--set",
            "train.keep_checkpoints=2",
        ],
        ranks=2,
    )
    before, after = loss_lines(whole.stdout), loss_lines(resumed.stdout)
    assert sorted(after) == [4, 5, 6] and all(after[s] == before[s] for s in after)
    a, b = load_file(tmp_path / "final_whole" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((run / "checkpoints").glob("step-*"))) == 2

    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    damaged = latest / "base-rank00001.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(AssertionError) as failed:
        deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config), "--resume", "auto"], ranks=2)
    assert str(failed.value).count(f"{damaged} is missing, truncated or altered") >= 2
