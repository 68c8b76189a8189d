"""Sparsity report of a model's pruned matrices, read from the weights themselves (evaluation.md: print the
measured sparsity beside every number, so a merge that silently densified is seen).

Works on a whole model in one process and on a ZeRO-3 partitioned one: each rank counts the zeros of its
own partition (padding excluded) and the counts are summed over ranks. A promise (the schedule's target)
is checked per matrix: the event prunes exactly floor(p·in) entries per row, so a matrix must have at least
that fraction of zeros and at most `tolerance` more (weights that happen to be exactly zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from exert_ds.model.architecture import block_linears, decoder_layers
from exert_ds.roles import ROLES

Reduce = Callable[[torch.Tensor], torch.Tensor]  # in-place sum over ranks


def _weight(module: nn.Module) -> nn.Parameter:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.weight


def _zeros_and_count(weight: nn.Parameter) -> tuple[float, float]:
    if hasattr(weight, "ds_tensor"):  # ZeRO-3: this rank's valid partition elements only
        from exert_ds.runtime.zero3 import local_values

        values = local_values(weight)
    else:
        values = weight.detach()
    return float((values == 0).sum()), float(values.numel())


@torch.no_grad()
def sparsity_report(model: nn.Module, reduce: Reduce | None = None) -> dict:
    """{"blocks": [{role: fraction}], "roles": {role: fraction}, "overall": fraction, "in_features": {role: n}}.

    Collective under ZeRO-3 (`reduce` = Zero3Backend().all_reduce); None for a single process.
    """
    layers = decoder_layers(model)
    counts = torch.zeros(len(layers), len(ROLES), 2, dtype=torch.float64)
    in_features: dict[str, int] = {}
    for block in range(len(layers)):
        for j, (role, module) in enumerate(block_linears(model, block).items()):
            weight = _weight(module)
            counts[block, j] = torch.tensor(_zeros_and_count(weight), dtype=torch.float64)
            in_features[role] = int(getattr(weight, "ds_shape", weight.shape)[-1])
    if reduce is not None:
        reduce(counts)
    per_role = counts.sum(0)
    total = counts.sum((0, 1))
    return {
        "blocks": [
            {role: float(counts[b, j, 0] / counts[b, j, 1]) for j, role in enumerate(ROLES)} for b in range(len(layers))
        ],
        "roles": {role: float(per_role[j, 0] / per_role[j, 1]) for j, role in enumerate(ROLES)},
        "overall": float(total[0] / total[1]),
        "in_features": in_features,
    }


def check_promise(report: dict, promised: float | list[float], tolerance: float = 0.01) -> dict:
    """Whether every matrix keeps the promised sparsity p: ≥ floor(p·in)/in zeros and ≤ p + tolerance. `promised`: one
    p for every block, or one per decoder block (prune.allocation owl; reported as their mean, the list under
    "blocks")."""
    owl = isinstance(promised, list)
    per_block = promised if owl else [promised] * len(report["blocks"])
    if len(per_block) != len(report["blocks"]):
        raise ValueError(f"{len(per_block)} block sparsities promised for a model of {len(report['blocks'])} blocks")
    failures = []
    for block, roles in enumerate(report["blocks"]):
        p = per_block[block]
        for role, measured in roles.items():
            width = report["in_features"][role]
            low = math.floor(p * width) / width
            if not (low - 1e-9 <= measured <= p + tolerance):
                failures.append(f"block {block} {role}: {measured:.4f}" + (f" (promised {p:.4f})" if owl else ""))
    result = {"promised": round(sum(per_block) / len(per_block), 12) if owl else promised, "tolerance": tolerance}
    if owl:
        result["blocks"] = list(per_block)
    return result | {"passed": not failures, "failures": failures}
