"""The prune schedule of algorithm.md §6."""

import pytest

from exert_ds.config import PruneConfig
from exert_ds.prune.schedule import plan_events


def test_epoch_schedule_matches_the_authors_default():
    events = plan_events(PruneConfig(sparsity=0.5), total_steps=30, steps_per_epoch=10)
    assert [e.step for e in events] == [10, 20, 30]  # E events for E epochs: epoch 0 dense
    assert [e.pbs for e in events] == [True, True, False]
    assert [e.ema for e in events] == [False, True, False]
    assert [e.final for e in events] == [False, False, True]
    assert all(e.sparsity == 0.5 for e in events)


def test_every_steps_and_start_step():
    events = plan_events(PruneConfig(sparsity=0.4, every_steps=4, start_step=2), total_steps=15, steps_per_epoch=15)
    assert [e.step for e in events] == [6, 10, 14, 15]
    assert [e.ema for e in events] == [False, True, True, False]


def test_cubic_ramp_reaches_target_at_last_event():
    events = plan_events(PruneConfig(sparsity=0.5, every_steps=5, ramp="cubic"), total_steps=20, steps_per_epoch=20)
    sparsities = [e.sparsity for e in events]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.5)
    assert sparsities[0] == pytest.approx(0.5 * (1 - (1 - 1 / 4) ** 3))


def test_disabled_and_single_epoch():
    assert plan_events(PruneConfig(enabled=False), 10, 10) == []
    (only,) = plan_events(PruneConfig(sparsity=0.5), total_steps=10, steps_per_epoch=10)
    assert only.final and only.step == 10 and not only.pbs and not only.ema


def test_pbs_at_final_runs_pbs_at_the_final_event_too():
    events = plan_events(PruneConfig(sparsity=0.5), total_steps=30, steps_per_epoch=10, pbs_at_final=True)
    assert [e.pbs for e in events] == [True, True, True] and events[-1].final and not events[-1].ema
    assert [e.pbs for e in plan_events(PruneConfig(sparsity=0.5), 30, 10)] == [True, True, False]
