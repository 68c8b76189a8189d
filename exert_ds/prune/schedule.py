"""When prune events happen and what each does (algorithm.md §6).

Epoch schedule (default): epoch 0 is dense LoRA; an event before the first step of every later epoch and
one after the last step (always: it leaves B = 0 and the model merged). `every_steps: K`: events before steps start_step + K, + 2K, ... and one at the
end. PBS at every event but the final one (and at that one too with `pbs.at_final`); EMA at every event but the first and the final one. With
`ramp: cubic` the sparsity of event i of n is p·(1 − (1 − i/n)³) (Zhu & Gupta), reaching p at the last.
"""

from __future__ import annotations

from dataclasses import dataclass

from exert_ds.config import PruneConfig


@dataclass(frozen=True)
class PlannedEvent:
    step: int  # the event runs before this optimizer step (== total_steps: after the last step)
    sparsity: float
    pbs: bool
    ema: bool
    final: bool


def plan_events(
    prune: PruneConfig, total_steps: int, steps_per_epoch: int, pbs_at_final: bool = False
) -> list[PlannedEvent]:
    """Every event of a run of `total_steps` optimizer steps, in order. `pbs_at_final` (`pbs.at_final`,
    algorithm.md §8 b): PBS at the final event too."""
    if not prune.enabled:
        return []
    if prune.every_steps is None:
        steps = list(range(steps_per_epoch, total_steps, steps_per_epoch))
    else:
        steps = list(range(prune.start_step + prune.every_steps, total_steps, prune.every_steps))
    steps = [s for s in steps if s >= prune.start_step] + [total_steps]
    count = len(steps)
    events = []
    for i, step in enumerate(steps):
        final = i == count - 1
        sparsity = prune.sparsity if prune.ramp == "none" else prune.sparsity * (1 - (1 - (i + 1) / count) ** 3)
        events.append(PlannedEvent(step, sparsity, pbs=pbs_at_final or not final, ema=0 < i and not final, final=final))
    return events


def one_shot_event(sparsity: float, pbs: bool) -> PlannedEvent:
    """The one event of a one-shot prune (`exert-ds prune`): before step 0, final (B = 0 after it), no EMA."""
    return PlannedEvent(0, sparsity, pbs=pbs, ema=False, final=True)
