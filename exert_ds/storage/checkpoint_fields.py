"""The per-rank tensor fields of a training checkpoint (checkpoint_schema.RankField), declared once in `FIELDS`:
the pruned base partitions (sparse-coded), the EMA score partitions, and the LoRA fp32 masters and Adam moments.

A new per-rank tensor is one more RankField in `FIELDS`; `checkpoint.save_checkpoint` stores it, both resume paths
assemble it through `checkpoint_schema.assemble` and give it to its `restore`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from deepspeed.utils import (
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import Tensor, nn

from exert_ds.model.architecture import decoder_layers
from exert_ds.model.lora import block_lora_layers, lora_parts
from exert_ds.runtime.zero3 import local_range, local_values, write_partition
from exert_ds.storage import sparse_codec
from exert_ds.storage.checkpoint_schema import EMA, PARAMS, TRAINABLE, WEIGHTS, RankField, Stored

MOMENTS = ("exp_avg", "exp_avg_sq")  # the Adam family's per-element state
FP32 = "fp32"


@dataclass
class TrainState:
    """What a checkpoint saves from and restores into: the engine, the EMA score state (PruneState.ema: block.role →
    flat host tensor of this rank's held elements) and, during a re-cut, the writing rank 0's engine scalars."""

    engine: object
    ema: dict[str, Tensor] = field(default_factory=dict)
    engine_scalars: dict | None = None


def pack_sparse(values: Tensor) -> dict[str, Tensor | int | torch.dtype]:
    """A flat tensor in the expert's sparse storage (sparse_codec.py: packed bitmask of non-zeros + kept values with
    their top byte 4-bit coded), lossless: a checkpoint's base is as small as the final expert's."""
    flat = values.detach().reshape(-1)
    return {"numel": flat.numel(), "dtype": flat.dtype, **sparse_codec.encode(flat, sparse_codec.plan(flat))}


def unpack_sparse(packed: dict[str, Tensor | int | torch.dtype]) -> Tensor:
    out = torch.empty(int(packed["numel"]), dtype=packed["dtype"])
    sparse_codec.decode_into(out, packed.__getitem__)
    return out


def _dense_or_sparse(stored: Stored) -> Tensor:
    """An EMA entry: sparse-coded (format 4) or a plain tensor (format 3)."""
    return unpack_sparse(stored) if isinstance(stored, dict) else stored


def pruned_base_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """name → base weight of every LoRA-wrapped projection (the weights prune events change)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for block in range(len(decoder_layers(model))):
        for layer in block_lora_layers(model, block).values():
            weight = lora_parts(layer)[0]
            out[names[id(weight)]] = weight
    return out


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """name → every trained (LoRA) parameter."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def ema_keys(model: nn.Module) -> dict[str, str]:
    """PruneState EMA key (block.role) → name of the base weight whose elements it scores."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        f"{block}.{role}": names[id(lora_parts(layer)[0])]
        for block in range(len(decoder_layers(model)))
        for role, layer in block_lora_layers(model, block).items()
    }


def _save_weights(state: TrainState) -> dict[str, Tensor]:
    return {n: local_values(p).to("cpu", copy=True) for n, p in pruned_base_weights(state.engine.module).items()}


def _restore_weights(state: TrainState, values: dict[str, Tensor]) -> None:
    for name, param in pruned_base_weights(state.engine.module).items():
        write_partition(param, values[name].to(param.ds_tensor.device))


def _save_ema(state: TrainState) -> dict[str, Tensor]:
    return {key: value.clone() for key, value in state.ema.items()}  # the next event writes the held ones in place


def _restore_ema(state: TrainState, values: dict[str, Tensor]) -> None:
    state.ema.update(values)


def _moment(param: nn.Parameter, key: str) -> Tensor | None:
    try:
        return safe_get_local_optimizer_state(param, key)
    except KeyError:  # no optimizer step yet: Adam creates its state lazily
        return None


def _save_trainable(state: TrainState) -> dict[str, dict[str, Tensor]]:
    """This rank's valid slice of every LoRA parameter's fp32 master and Adam moments: what a resume at another
    world size re-cuts (DeepSpeed's own files hold them in a per-world flat layout)."""
    out = {}
    for name, param in trainable_params(state.engine.module).items():
        valid = local_range(param).valid
        entry = {FP32: safe_get_local_fp32_param(param).reshape(-1)[:valid].to("cpu", copy=True)}
        for key in MOMENTS:
            moment = _moment(param, key)
            if moment is not None:
                entry[key] = moment.reshape(-1)[:valid].to("cpu", copy=True)
        out[name] = entry
    return out


def _padded(param: nn.Parameter, values: Tensor) -> Tensor:
    out = torch.zeros(param.ds_tensor.numel(), dtype=torch.float32, device=param.ds_tensor.device)
    out[: values.numel()] = values
    return out


def _restore_trainable(state: TrainState, values: dict[str, dict[str, Tensor]]) -> None:
    """Re-cut only (DeepSpeed restores it at the writing world size): the working partition, the fp32 master and,
    when the writer had stepped, the Adam moments, created as the optimizer would create them at its first step."""
    engine = state.engine
    trained = trainable_params(engine.module)
    has_moments = all(k in values[next(iter(trained))] for k in MOMENTS)
    if has_moments:
        basic = engine.optimizer.optimizer
        for flat in engine.optimizer.fp32_partitioned_groups_flat:
            basic.state[flat] = {
                **state.engine_scalars["state_scalars"],
                **{k: torch.zeros_like(flat) for k in MOMENTS},
            }
    for name, param in trained.items():
        piece = values[name]
        write_partition(param, piece[FP32].to(param.ds_tensor.device))
        safe_set_local_fp32_param(param, _padded(param, piece[FP32]))
        for key in MOMENTS if has_moments else ():
            safe_set_local_optimizer_state(param, _padded(param, piece[key]), key)


FIELDS: tuple[RankField, ...] = (
    RankField(
        WEIGHTS,
        PARAMS,
        names=lambda model: {n: n for n in pruned_base_weights(model)},
        save=_save_weights,
        restore=_restore_weights,
        encode=pack_sparse,
        decode=unpack_sparse,
    ),
    RankField(
        EMA,
        PARAMS,
        names=ema_keys,
        save=_save_ema,
        restore=_restore_ema,
        encode=pack_sparse,
        decode=_dense_or_sparse,
    ),
    RankField(
        TRAINABLE,
        TRAINABLE,
        names=lambda model: {n: n for n in trainable_params(model)},
        save=_save_trainable,
        restore=_restore_trainable,
        by_engine=True,
    ),
)
