"""Projection energy of a model on one domain's calibration data, per block and role (algorithm.md §1).

The calibration pass is the prune event's own (prune/calibration.py): block 0's inputs captured once, then block by
block a forward whose hooks accumulate, for every projection input X (tokens × in), the activation energy
E_c = Σ_t x_{t,c}² (InputStatistics; all-reduced over ranks, each rank taking its share of the sequences), and its
output's energy Σ_t ‖W x_t‖²; the block's outputs are the next block's inputs. Under ZeRO-3 each block is gathered
for its pass (as in the event), and its ForeSight companion factors F_role (algorithm.md §1's table) are read from
the gathered weights. Per block and role, with T tokens:
- `input_energy` = Σ_c E_c / T: mean squared norm of the projection's input;
- `output_energy` = Σ_t ‖W x_t‖² / T: mean squared norm of its output (bias included where the model has one);
- `companion_rms` = sqrt(mean over W's entries of F²) (1 for down); a property of the weights, not of the data;
- `foresight_mean` = mean over W's entries of |W|·sqrt(E_c/T)·F: the ForeSight score per token scale.
Per block and input group (q/k/v share `q`'s input, gate/up share `gate`'s), `channel_rms` = sqrt(E/T) (in,): the
profile that `profile_distance` compares between domains.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack

import torch
from torch import Tensor, nn

from exert_ds.model.architecture import block_linears, decoder_layers, geometry
from exert_ds.prune.calibration import InputStatistics, advance_block, capture_block_inputs
from exert_ds.prune.foresight import HeadGeometry, companion_factors, companion_sumsq, role_scores
from exert_ds.roles import ROLES, STAT_GROUP


def _output_energy_hooks(linears: dict[str, nn.Module], sums: dict[str, Tensor]) -> list:
    def hook(role: str):
        def accumulate(_module: nn.Module, _args: tuple, output: Tensor) -> None:
            sums[role] += output.detach().double().square().sum().to(sums[role].device)

        return accumulate

    return [module.register_forward_hook(hook(role)) for role, module in linears.items()]


def _companions(linears: dict[str, nn.Module], geom: HeadGeometry) -> dict:
    """Full weights (copied to the host in float32 while the block is gathered) and their companion factors."""
    weights = {role: m.weight.detach().to("cpu", torch.float32, copy=True) for role, m in linears.items()}
    sumsq = {r: companion_sumsq(r, w, 0, w.shape[0], geom) for r, w in weights.items() if r != "v"}
    return weights, companion_factors(sumsq, geom)


@torch.no_grad()
def projection_energy(
    model: nn.Module,
    input_ids: Tensor,
    micro_batch: int,
    all_reduce: Callable[[Tensor], Tensor],
    whole_block: Callable[[nn.Module], AbstractContextManager[None]],
) -> dict:
    """{"tokens": T, "roles": role → per block {input_energy, output_energy, companion_rms, foresight_mean},
    "channel_rms": group → per block list (in,)} over this rank's share `input_ids` (N_r × seq) of the calibration
    sequences, reduced over ranks by `all_reduce` (in-place sum; identity in one process). `whole_block(layer)`
    gathers a block for its pass (ZeRO-3) or does nothing. Every rank must call it with the same number of
    micro-batches (ZeRO-3's forwards are collective)."""
    model.eval()
    geo = geometry(model)
    geom = HeadGeometry(geo.num_heads, geo.num_kv_heads, geo.head_dim)
    inputs = capture_block_inputs(model, input_ids, micro_batch)
    device = inputs[0].hidden.device if inputs else input_ids.device
    roles: dict[str, list[dict[str, float]]] = {role: [] for role in ROLES}
    channels: dict[str, list[list[float]]] = {group: [] for group in dict.fromkeys(STAT_GROUP.values())}
    tokens_total = 0.0
    for block, layer in enumerate(decoder_layers(model)):
        linears = block_linears(model, block)
        stats = InputStatistics(linears, want_hessian=False)
        out_sums = {role: torch.zeros((), dtype=torch.float64, device=device) for role in ROLES}
        with ExitStack() as stack:
            stack.enter_context(whole_block(layer))
            stack.enter_context(stats.recording())
            handles = _output_energy_hooks(linears, out_sums)
            stack.callback(lambda hs=handles: [h.remove() for h in hs])
            weights, factors = _companions(linears, geom)
            inputs = advance_block(layer, inputs)
        reduced = torch.tensor([float(stats.tokens), *(float(out_sums[r]) for r in ROLES)], dtype=torch.float64)
        reduced = all_reduce(reduced.to(device)).cpu()
        tokens = float(reduced[0])
        tokens_total = tokens
        energy = {group: all_reduce(e).cpu().double() for group, e in sorted(stats.energy.items())}
        for group, e in energy.items():
            channels[group].append((e / tokens).sqrt().tolist())
        for i, role in enumerate(ROLES):
            e = energy[STAT_GROUP[role]]
            weight, factor = weights[role], factors[role]
            rms = factor.on_rows(0, weight.shape[0], geom.head_dim)
            rms = float(torch.as_tensor(rms, dtype=torch.float64).square().expand(weight.shape).mean().sqrt())
            scores = role_scores(weight, 0, (e / tokens).float(), factor, geom.head_dim)
            roles[role].append(
                {
                    "input_energy": float(e.sum() / tokens),
                    "output_energy": float(reduced[1 + i] / tokens),
                    "companion_rms": rms,
                    "foresight_mean": float(scores.double().mean()),
                }
            )
        del weights, factors, stats
    return {"tokens": tokens_total, "roles": roles, "channel_rms": channels}


def profile_distance(x: list[float], y: list[float]) -> float:
    """1 − cosine similarity of two channel RMS profiles (in,): 0 when one is a positive multiple of the other."""
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    return float(1.0 - torch.nn.functional.cosine_similarity(a, b, dim=0))


def energy_differences(x: dict, y: dict) -> dict[str, list[dict[str, float]]]:
    """role → per block, how two energy results differ: `profile` = profile_distance of the role's input channel
    RMS profiles, `output_log_ratio` = |ln(output_energy_x / output_energy_y)|."""
    out: dict[str, list[dict[str, float]]] = {}
    for role in ROLES:
        group = STAT_GROUP[role]
        rows = []
        for block, (ex, ey) in enumerate(zip(x["roles"][role], y["roles"][role], strict=True)):
            ratio = ex["output_energy"] / ey["output_energy"] if ey["output_energy"] > 0 else float("inf")
            rows.append(
                {
                    "profile": profile_distance(x["channel_rms"][group][block], y["channel_rms"][group][block]),
                    "output_log_ratio": abs(float(torch.tensor(ratio, dtype=torch.float64).log())),
                }
            )
        out[role] = rows
    return out
