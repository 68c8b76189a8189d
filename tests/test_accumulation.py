"""Gradient accumulation and epochs (issue 21, fault 2): an epoch of 5 micro-batches with accumulation 2 drops its
leftover micro-batch, so no optimizer step straddles an epoch and no prune event or checkpoint happens while the
engine holds unapplied gradient. Checked against independent references: the uninterrupted run (for a resume),
and a 2-rank run without accumulation (the same global batches)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from exert_ds.train.trainer import assert_at_boundary
from tests.fixtures import health_sentences, run_yaml, write_jsonl
from tests.launch import REPO, deepspeed_cpu

CHECKPOINT_AT_FIRST_EVENT = "step-00000003-event-001"  # events before step 3 and at the end (step 4)


def accumulation_yaml(tmp: Path, examples: int) -> Path:
    """`examples` training examples (one per record, not packed) in batches of 2 of micro-batch 1: on 1 rank an
    epoch is `examples` micro-batches with accumulation 2, on 2 ranks ⌊examples / 2⌋ with accumulation 1. Two
    epochs, an event every 3 steps, a checkpoint after every step."""
    tmp.mkdir(parents=True, exist_ok=True)
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds.pop("gradient_accumulation_steps")
    (tmp / "ds.json").write_text(json.dumps({**ds, "train_batch_size": 2, "train_micro_batch_size_per_gpu": 1}))
    train = write_jsonl(tmp / "train.jsonl", [{"text": s} for s in health_sentences(examples, seed=1)])
    return run_yaml(
        tmp,
        deepspeed=str(tmp / "ds.json"),
        data={"train": [{"path": str(train)}], "seq_len": 16, "packing": False},
        calibration={"sources": [{"path": str(tmp / "health.jsonl")}], "num_samples": 8, "seq_len": 16},
        prune={"sparsity": 0.5, "every_steps": 3},
        train={"epochs": 2, "save_every_steps": 1, "keep_checkpoints": 20},
    )


def train(config: Path, ranks: int, *extra: str) -> dict[str, torch.Tensor]:
    deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config), *extra], ranks=ranks)
    return load_file(config.parent / "run" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The uninterrupted 1-rank run of 5 micro-batches per epoch; its checkpoints are kept."""
    config = accumulation_yaml(tmp_path_factory.mktemp("accumulation"), examples=5)
    final = train(config, ranks=1)
    return config, final


@pytest.mark.distributed
def test_resume_from_the_first_event_equals_the_uninterrupted_run(one_rank):
    config, uninterrupted = one_rank
    root = config.parent / "run" / "checkpoints"
    names = sorted(p.name for p in root.glob("step-*"))
    # 2 steps per epoch (the 5th micro-batch is dropped), 4 in all: a checkpoint after every step and every event
    assert names == [
        "step-00000001-event-000",
        "step-00000002-event-000",
        "step-00000003-event-000",
        "step-00000003-event-001",
        "step-00000004-event-001",
        "step-00000004-event-002",
    ], names
    resumed_dir = config.parent / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(root / CHECKPOINT_AT_FIRST_EVENT, resumed_dir / "checkpoint")
    resumed = train(config, 1, "--resume", str(resumed_dir / "checkpoint"))
    assert uninterrupted.keys() == resumed.keys() and len(uninterrupted) == 21
    differ = [name for name in uninterrupted if not torch.equal(uninterrupted[name], resumed[name])]
    assert not differ, differ


@pytest.mark.distributed
def test_one_rank_with_accumulation_equals_two_ranks_without(one_rank, tmp_path):
    """The same global batches: 1 rank × accumulation 2 and 2 ranks × accumulation 1 give the same zeros and,
    up to the order of float32 sums, the same weights."""
    _, accumulated = one_rank
    two_ranks = train(accumulation_yaml(tmp_path, examples=5), ranks=2)
    for name, want in accumulated.items():
        got = two_ranks[name]
        assert torch.equal(got == 0, want == 0), name
        assert float((got - want).norm() / want.norm()) <= 1e-5, name


def test_an_event_or_checkpoint_off_a_boundary_is_a_programming_error():
    """The trainer's internal check: it and the engine agree that no gradient is pending."""
    engine = SimpleNamespace(micro_steps=6, global_steps=3, gradient_accumulation_steps=lambda: 2)
    assert_at_boundary(engine, step=3)
    with pytest.raises(AssertionError, match="pending"):
        assert_at_boundary(SimpleNamespace(**{**vars(engine), "micro_steps": 7}), step=3)
    with pytest.raises(AssertionError, match="optimizer steps"):
        assert_at_boundary(engine, step=4)
