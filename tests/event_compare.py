"""One prune event in one process, the cases that cover every registered scorer, and algorithm.md §9's comparison:
shared by the 1-rank and the 2-rank event tests."""

from __future__ import annotations

from exert_ds.prune.event import run_prune_event
from exert_ds.prune.scorers import SCORERS
from exert_ds.runtime.access import DenseBackend
from tests.tiny_models import calibration_ids, event_config, tiny_lora_model

OWL_TEST_THRESHOLD = (
    2.0  # the tiny models' random weights have few metrics above OWL's 5× the mean: blocks differ at 2×
)


def case_config(case: str, **train):
    """`case` = "scorer:pbs_mode" followed by any of ":obs" (prune.reconstruct obs) and ":owl" (prune.allocation owl,
    λ 0.08, threshold OWL_TEST_THRESHOLD): the event's config at sparsity 0.5, seed 5 (`train` keys:
    reset_after_prune, micro_batch)."""
    scorer, pbs_mode, *rest = case.split(":")
    prune = {"reconstruct": "obs"} if "obs" in rest else {}
    if "owl" in rest:
        prune |= {"allocation": "owl", "owl_threshold": OWL_TEST_THRESHOLD}
    return event_config(sparsity=0.5, scorer=scorer, pbs_mode=pbs_mode, seed=5, **prune, **train)


def dense_event(family: str, case: str, layers: int = 2, micro_batch: int = 4):
    """One event of `case` (see case_config) on tiny_lora_model(family): (parameters, report scalars)."""
    model = tiny_lora_model(family, layers=layers)
    settings = case_config(case, micro_batch=micro_batch)
    report, _ = run_prune_event(model, DenseBackend(), settings, calibration_ids(), pbs=settings.pbs.mode != "off")
    return dict(model.named_parameters()), report.scalars()


def every_registered_case() -> list[str]:
    """Each registered scorer; a mask scorer under both PBS solves (hessian: H, reference: E), an updating one alone;
    the OBS reconstruction of the kept weights (a solve on H too); the OWL allocation over blocks."""
    return [
        f"{name}:{mode}"
        for name, scorer in SCORERS.items()
        for mode in (("off",) if scorer.updates_weights else ("hessian", "reference"))
    ] + [
        "foresight:hessian:obs",  # prune.reconstruct obs, with and without PBS after it
        "wanda:off:obs",
        "foresight:hessian:owl",  # prune.allocation owl, with a mask scorer and with one that updates the weights
        "sparsegpt:off:owl",
    ]


def assert_same_weights(want: dict, got: dict, case: str, tolerance: float = 1e-5) -> None:
    """algorithm.md §9: the same zeros (the random inputs hold no exact score ties) and every pruned matrix within
    `tolerance` (§9: 1e-5) of the reference, as max |a − b| / max |a| (issue 21's measure, stricter than a norm
    ratio)."""
    for name, param in want.items():
        if "base_layer" not in name:
            continue
        theirs = got[name]
        moved = int(((param != 0) != (theirs != 0)).sum())
        assert moved == 0, f"{case}: {moved} zeros of {name} moved"
        rel = float((param - theirs).abs().max() / param.abs().max())
        assert rel <= tolerance, f"{case}: {name} differs by {rel:.2e} relative"
