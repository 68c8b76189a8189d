"""`prune.allocation: owl`: outlier-weighted layer-wise sparsity (OWL; Yin et al., "Outlier Weighed Layerwise
Sparsity (OWL)", ICML 2024, arXiv 2310.05175, §3 and its code's `prune_wanda_outlier`), algorithm.md §8 d.

A pre-pass measures each decoder block's outlier ratio D_l on the calibration data, propagated through the model as
it is before the first event (no block pruned): the share of the block's pruned weights (its seven projections
together) whose Wanda metric |U_ij|·‖X_j‖ exceeds M times the block's mean metric (U = W + s·B·A; M =
`prune.owl_threshold`). Blocks with more outliers are pruned less: D is rescaled to [0, 2λ] (λ = `prune.owl_lambda`)
and shifted so that the mean density is 1 − p: block sparsities 2λ apart from the least to the most pruned, whose
mean is p (every decoder block has the same shapes, so the overall sparsity stays p up to each row's floor).

The allocation is measured once, at the first event, and kept (PruneState.allocation, checkpointed in the training
position) so that every event and every resume uses the same one. An event at the schedule's sparsity p_e (a ramp's
point) prunes block l at p_e · s_l / p, so the allocation's shape holds along the ramp.

Under ZeRO-3 each rank counts the elements it holds (E all-reduced first) and the counts are summed in float64: the
ratios agree across world sizes up to rounding (an element within rounding of the threshold could count differently;
a resume reads the recorded allocation, never measures it again).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from exert_ds.model.architecture import decoder_layers
from exert_ds.model.lora import block_lora_layers
from exert_ds.prune.calibration import InputStatistics, advance_block, capture_block_inputs, run_block
from exert_ds.runtime.access import Backend


def owl_sparsities(outlier_ratios: list[float], sparsity: float, owl_lambda: float) -> list[float]:
    """Block sparsities from the blocks' outlier ratios (OWL's allocation, as its code computes it).

    outlier_ratios: D_l per block (any unit: only their spread is used); sparsity: the target p in [0, 1);
    owl_lambda: λ > 0, with p − 2λ ≥ 0 and p + 2λ < 1 (config.py checks it), which keeps every s_l in [0, 1).
    Returns s_l = p + mean(r) − r_l with r_l = 2λ·(D_l − min D)/(max D − min D): mean(s) = p, max(s) − min(s) = 2λ,
    the block with most outliers pruned least; all blocks at p when every D_l is the same."""
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)  # (blocks,)
    spread = float(ratios.max() - ratios.min())
    if spread == 0.0:
        return [sparsity] * len(outlier_ratios)
    scaled = (ratios - ratios.min()) / spread * (2 * owl_lambda)  # r_l ∈ [0, 2λ]
    return (sparsity + scaled.mean() - scaled).tolist()


def event_block_sparsities(allocation: list[float] | None, target: float, sparsity: float, blocks: int) -> list[float]:
    """The sparsity of each of `blocks` decoder blocks at an event of schedule sparsity `sparsity`: uniform without an
    allocation, else allocation[l] · sparsity / target (the allocation's shape along a ramp; exactly the allocation
    at the target)."""
    if allocation is None or target == 0.0:
        return [sparsity] * blocks
    if sparsity == target:  # exactly the allocation, as the expert's promise states it (no rounding of s·p/p)
        return list(allocation)
    return [s * sparsity / target for s in allocation]


def block_outlier_ratio(metrics: list[Tensor], threshold: float, all_reduce: Callable[[Tensor], Tensor]) -> float:
    """D of one block: the share of its held elements whose metric exceeds `threshold` × the block's mean metric.

    metrics: this process's held elements' Wanda metric per projection, each 1-D (elements held,); the sum and the
    counts are all-reduced in float64 (`all_reduce`: in-place sum over processes)."""
    total = torch.zeros(2, dtype=torch.float64)  # (sum of metrics, elements)
    for metric in metrics:
        total += torch.tensor([float(metric.double().sum()), metric.numel()], dtype=torch.float64)
    total = all_reduce(total)
    mean = float(total[0] / total[1])
    above = torch.tensor(
        [sum(int((metric.double() > threshold * mean).sum()) for metric in metrics)], dtype=torch.float64
    )
    above = all_reduce(above)
    return float(above[0] / total[1])


@torch.no_grad()
def measure_outlier_ratios(
    model: nn.Module, backend: Backend, calibration_ids: Tensor, micro_batch: int, threshold: float
) -> list[float]:
    """Collective. D_l of every decoder block of the PEFT LoRA `model` (OWL's pre-pass), on `calibration_ids`
    ((N_rank, T): this process's share of the calibration token ids), the blocks run as they are, unpruned."""
    inputs = capture_block_inputs(model, calibration_ids, micro_batch)
    ratios = []
    for block, layer in enumerate(decoder_layers(model)):
        lora_layers = block_lora_layers(model, block)
        stats = InputStatistics(lora_layers, want_hessian=False)
        with stats.recording(), backend.whole_block(layer):
            run_block(layer, inputs)
        stats.reduce(backend.all_reduce)
        metrics = []
        for role, lora in lora_layers.items():
            acc = backend.linear(lora)
            a, b, scale = acc.adapter()  # A: (r, in), B: (out, r)
            w_block = acc.weight_block()  # (rows_held, in)
            u_block = w_block + scale * (b[acc.row_start : acc.row_start + w_block.shape[0]] @ a)
            metric = u_block.abs() * stats.for_role(role)[0].sqrt()  # Wanda's |U_ij|·‖X_j‖: (rows_held, in)
            valid = acc.valid()
            metrics.append(metric.reshape(-1) if valid is None else metric[valid])
        ratios.append(block_outlier_ratio(metrics, threshold, backend.all_reduce))
        del stats, metrics
        with backend.whole_block(layer):
            inputs = advance_block(layer, inputs)
    return ratios
