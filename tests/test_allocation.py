"""prune.allocation owl (algorithm.md §8 d, prune/allocation.py) against independent references: OWL's published
formula written out in numpy, the outlier ratios from a plain forward of the whole model, and the zeros of every row
after the event, the merge and the expert's write (the 2-rank comparison is in test_zero3_event.py's
every-registered-scorer test, which includes the owl cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from exert_ds.config import load_config
from exert_ds.evaluation.sparsity import check_promise, sparsity_report
from exert_ds.model.architecture import block_linears, decoder_layers
from exert_ds.model.lora import lora_parts
from exert_ds.prune import allocation
from exert_ds.prune.allocation import event_block_sparsities, measure_outlier_ratios, owl_sparsities
from exert_ds.prune.event import PruneEvent
from exert_ds.runtime.access import DenseBackend
from tests.event_compare import case_config
from tests.tiny_models import calibration_ids, tiny_lora_model


def owl_reference(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """OWL's allocation as its code writes it (lib/prune_all.py, prune_wanda_outlier): densities rescaled to [0, 2λ],
    shifted to mean 1 − p; a block's sparsity is 1 − its density."""
    d = np.array(ratios)
    d = (d - d.min()) * (1 / (d.max() - d.min()) * lam * 2)
    d = d - np.mean(d) + (1 - sparsity)
    return list(1 - d)


def test_owl_sparsities_follow_the_papers_formula():
    ratios = [0.9, 3.1, 1.7, 0.2, 2.5]
    got = owl_sparsities(ratios, 0.5, 0.08)
    np.testing.assert_allclose(got, owl_reference(ratios, 0.5, 0.08), rtol=0, atol=1e-12)
    assert math.isclose(sum(got) / len(got), 0.5, abs_tol=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * 0.08, abs=1e-12)
    assert got[1] == min(got) and got[3] == max(got)  # most outliers: pruned least
    assert owl_sparsities([1.0, 1.0, 1.0], 0.4, 0.08) == [0.4, 0.4, 0.4]


def test_event_sparsities_scale_the_allocation_along_a_ramp():
    alloc = [0.45, 0.55]
    assert event_block_sparsities(None, 0.5, 0.3, 2) == [0.3, 0.3]
    assert event_block_sparsities(alloc, 0.5, 0.5, 2) == alloc  # exactly, as the expert's promise states it
    assert event_block_sparsities(alloc, 0.5, 0.25, 2) == pytest.approx([0.225, 0.275])


def reference_ratios(model, ids: torch.Tensor, threshold: float) -> list[float]:
    """Per block: the share of |W + s·B·A|·‖x_j‖ (its seven projections together) above threshold × their mean, with
    ‖x_j‖ from each projection's inputs in one plain forward of the whole (unpruned) model."""
    energy: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for block in range(len(decoder_layers(model))):
        for role, module in block_linears(model, block).items():

            def hook(_m, args, _out, key=(block, role)):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                energy[key] = energy.get(key, 0) + x.square().sum(0)

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    ratios = []
    for block in range(len(decoder_layers(model))):
        metrics = []
        for role, module in block_linears(model, block).items():
            w, a, b, s = lora_parts(module)
            metrics.append(((w + s * b @ a).double().abs() * energy[(block, role)].sqrt()).reshape(-1))
        flat = torch.cat(metrics)
        ratios.append(float((flat > threshold * flat.mean()).double().mean()))
    return ratios


def test_outlier_ratios_equal_a_plain_forward():
    model = tiny_lora_model("llama-63", layers=3).eval()
    ids = calibration_ids()
    got = measure_outlier_ratios(model, DenseBackend(), ids, micro_batch=4, threshold=2.0)
    want = reference_ratios(model, ids, 2.0)
    assert got == pytest.approx(want, abs=1e-12)
    assert len(set(got)) == 3 and all(0 < r < 1 for r in got)  # the test's threshold separates the blocks


@pytest.mark.parametrize("case", ["foresight:hessian:owl", "sparsegpt:off:owl", "wanda:off:owl"])
def test_every_row_loses_its_blocks_share_and_the_allocation_is_kept(case, monkeypatch):
    """After an owl event each pruned row of block l holds exactly ⌊s_l·in⌋ zeros; the blocks differ and average to
    p; the first event, at a ramp point p_e = 0.25, prunes block l at p_e·s_l/p, and the second, at the target,
    reuses the allocation (no second pre-pass) at s_l."""
    model = tiny_lora_model("llama-63", layers=3)
    cfg = case_config(case)
    event = PruneEvent(model, DenseBackend(), cfg)
    measured = []
    real = allocation.measure_outlier_ratios

    def counting(*args, **kwargs):
        measured.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("exert_ds.prune.event.measure_outlier_ratios", counting)
    for sparsity in (0.25, 0.5):
        event.run(calibration_ids(), sparsity, pbs=cfg.pbs.mode != "off", ema=True, progress=False)
        alloc = event.state.allocation
        assert alloc is not None and len(set(alloc)) == 3
        assert sum(alloc) / 3 == pytest.approx(0.5, abs=1e-12)
        for block in range(3):
            p = alloc[block] * sparsity / 0.5
            for role, module in block_linears(model, block).items():
                w = lora_parts(module)[0]
                zeros = (w == 0).sum(1)
                assert torch.all(zeros == math.floor(p * w.shape[1])), (sparsity, block, role)
    assert measured == [1]


def test_owl_expert_keeps_its_per_block_promise(tmp_path):
    """The expert's manifest promises each block's own zeros per row, its reader checks them, and the evaluation's
    per-matrix check passes against the per-block promise and fails against a uniform one."""
    from exert_ds.storage.expert import expert_tensors, write_expert
    from exert_ds.storage.expert_model import promised_sparsity
    from exert_ds.storage.manifest import read_expert_manifest
    from tests.fixtures import save_tokenizer

    model = tiny_lora_model("llama-63", layers=3)
    cfg = case_config("foresight:hessian:owl")
    event = PruneEvent(model, DenseBackend(), cfg)
    event.run(calibration_ids(), 0.5, pbs=True, ema=False, progress=False)
    alloc = event.state.allocation
    out = write_expert(model, save_tokenizer(tmp_path / "tok"), tmp_path / "expert", 0.5, block_sparsity=alloc)
    manifest = read_expert_manifest(out)
    assert manifest["promise"]["blocks"] == alloc and promised_sparsity(manifest) == alloc
    for name, entry in manifest["tensors"].items():
        if entry["storage"] == "sparse":
            block = int(name.split(".layers.")[1].split(".")[0])
            assert entry["zeros_per_row"] == math.floor(alloc[block] * entry["shape"][-1]), name
    assert sum(1 for _ in expert_tensors(out)) == len(manifest["tensors"])  # read, checking every promise
    report = sparsity_report(model)
    assert check_promise(report, alloc)["passed"]
    uniform = check_promise(report, 0.5)
    assert not uniform["passed"] and uniform["failures"]


def test_uniform_allocation_leaves_the_fingerprint_alone(tmp_path):
    """Checkpoints written before the OWL keys existed still resume: with allocation uniform they do not count."""
    from tests.fixtures import run_yaml

    def fingerprint(**prune) -> str:
        return load_config(run_yaml(tmp_path, prune={"sparsity": 0.5, **prune})).fingerprint()

    uniform = fingerprint()
    assert fingerprint(owl_lambda=0.1) == uniform
    owl = fingerprint(allocation="owl")
    assert owl != uniform and owl != fingerprint(allocation="owl", owl_threshold=3.0)
