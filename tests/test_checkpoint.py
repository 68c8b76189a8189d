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


def test_replayed_adam_step_counter_makes_cpu_adam_resume_bit_identical():
    """DeepSpeed's CPU FusedAdam keeps βᵗ as a running float product in C++; a fresh optimizer loaded at step t
    recomputes it with pow() and, for some t, rounds every later update differently. After the replay it does not."""
    import copy

    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import FusedAdam

    from exert_ds.checkpoint import replay_adam_step_counter

    if get_accelerator().device_name() != "cpu":
        pytest.skip("the CPU Adam kernel is what keeps the state")
    grads = torch.randn(10, 1000, generator=torch.Generator().manual_seed(0))
    param = torch.nn.Parameter(torch.randn(1000, generator=torch.Generator().manual_seed(1)))
    optimizer, snapshots = FusedAdam([param], lr=1e-2), []
    for grad in grads:
        snapshots.append((param.detach().clone(), copy.deepcopy(optimizer.state_dict())))
        param.grad = grad.clone()
        optimizer.step()
    outcomes = {}
    for t in range(1, len(grads)):
        for replay in (False, True):
            resumed = torch.nn.Parameter(snapshots[t][0].clone())
            fresh = FusedAdam([resumed], lr=1e-2)
            fresh.load_state_dict(copy.deepcopy(snapshots[t][1]))
            if replay:
                replay_adam_step_counter(fresh)
            for grad in grads[t:]:
                resumed.grad = grad.clone()
                fresh.step()
            outcomes[t, replay] = torch.equal(resumed.detach(), param.detach())
    assert all(outcomes[t, True] for t in range(1, len(grads)))
    assert not all(outcomes[t, False] for t in range(1, len(grads)))  # the bug is real without the replay
