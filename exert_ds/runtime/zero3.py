"""The prune event's view of DeepSpeed ZeRO-3 partitions (zero3.md).

Each rank sees, per LoRA linear, the row block of its own flat partition of the frozen base weight
(`p.ds_tensor`, sliced to its valid length; shard.py has the geometry). Boundary rows are completed by
an all-gather of at most two row fragments per rank; the small LoRA A and B are gathered whole. Writes
reach every copy: the partition, the full copy of a parameter that is currently available (persistent
parameters, below `stage3_param_persistence_threshold`), the fp32 master and the Adam moments.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import (
    safe_get_local_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
    set_z3_leaf_module,
    z3_leaf_module,
)
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from exert_ds.errors import ConfigError
from exert_ds.model.architecture import decoder_layers
from exert_ds.model.lora import lora_parts
from exert_ds.runtime.access import ResetPolicy, reset_adam_moments
from exert_ds.runtime.shard import (
    ShardRange,
    boundary_rows,
    from_row_block,
    owned_rows,
    row_block,
    shard_range,
    valid_mask_of_block,
)


def local_range(param: nn.Parameter) -> ShardRange:
    """This rank's valid flat range of a ZeRO-3 parameter."""
    return shard_range(param.ds_numel, tuple(param.ds_shape), dist.get_world_size(), dist.get_rank())


def local_values(param: nn.Parameter) -> Tensor:
    """This rank's valid partition elements (the padding of the last partition sliced off)."""
    return param.ds_tensor.view(-1)[: local_range(param).valid]


def _all_gather(tensor: Tensor) -> Tensor:
    """(world, *tensor.shape): every rank's tensor, same shape on all ranks."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


@torch.no_grad()
def write_partition(param: nn.Parameter, values: Tensor) -> None:
    """Write this rank's valid elements of `param`; refresh the full copy if one is live on the ranks.

    Collective when the parameter is available (persistent): every rank must call it for the same param.
    """
    rng = local_range(param)
    param.ds_tensor.view(-1)[: rng.valid].copy_(values.to(param.ds_tensor.dtype))
    if param.ds_status == ZeroParamStatus.AVAILABLE:
        gathered = _all_gather(param.ds_tensor.view(-1).to(param.device))
        param.data.copy_(gathered.view(-1)[: param.ds_numel].view(param.ds_shape))


def _local_moment(param: nn.Parameter, key: str) -> Tensor | None:
    try:
        return safe_get_local_optimizer_state(param, key)
    except KeyError:
        return None


class Zero3Linear:
    """A LoRA linear whose base weight is partitioned by ZeRO-3."""

    def __init__(self, layer: LoraLayer, device: torch.device) -> None:
        self._w, self._a, self._b, self._scale = lora_parts(layer)
        self._device = device
        self._range = local_range(self._w)
        self.row_start = self._range.row_start
        self.shape = tuple(self._w.ds_shape)
        self._valid = valid_mask_of_block(self._range, device)

    def valid(self) -> Tensor:
        return self._valid

    def owned(self) -> Tensor:
        """(rows_held,) bool: the block's rows whose first element this rank holds (shard.owned_rows)."""
        rng, rows = self._range, owned_rows(self._range)
        mask = torch.zeros(rng.num_rows, dtype=torch.bool, device=self._device)
        mask[rows.start - rng.row_start : rows.stop - rng.row_start] = True
        return mask

    def weight_block(self) -> Tensor:
        values = local_values(self._w).to(self._device, torch.promote_types(self._w.ds_tensor.dtype, torch.float32))
        return row_block(values, self._range)

    def complete_rows(self, block: Tensor) -> Tensor:
        """Each partial first/last row of `block` (shard.boundary_rows) becomes the sum over the ranks that touch it of
        their versions of that row: fragments zero outside the held elements assemble the whole row; the whole row on
        its owner and zeros on the other ranks hand the owner's row out. Collective: every rank calls it."""
        rng, width = self._range, self.shape[1]
        sent = block.new_zeros(2, width + 1)  # (2 fragment slots, in + the fragment's row index)
        sent[:, width] = -1  # row index of each fragment slot; -1 = empty
        partial = [row - rng.row_start for row in boundary_rows(rng)]
        for slot, local_row in enumerate(partial):
            sent[slot, :width] = block[local_row]
            sent[slot, width] = rng.row_start + local_row
        received = _all_gather(sent).view(-1, width + 1)
        if not partial:
            return block
        out = block.clone()
        for local_row in partial:
            from_row = received[:, width] == rng.row_start + local_row
            out[local_row] = received[from_row, :width].sum(0)
        return out

    def write_weight_block(self, block: Tensor) -> None:
        write_partition(self._w, from_row_block(block, self._range))

    def adapter(self) -> tuple[Tensor, Tensor, float]:
        with deepspeed.zero.GatheredParameters([self._a, self._b]):
            work = torch.promote_types(self._a.dtype, torch.float32)
            return (
                self._a.detach().to(self._device, work).clone(),
                self._b.detach().to(self._device, work).clone(),
                self._scale,
            )

    @torch.no_grad()
    def write_adapter(self, a: Tensor, b: Tensor, reset_policy: ResetPolicy) -> None:
        for param, value in ((self._a, a), (self._b, b)):
            rng = local_range(param)
            local = value.reshape(-1)[rng.start : rng.end]
            write_partition(param, local)
            if not hasattr(param, "_z3_optimizer"):
                continue  # no optimizer (a one-shot prune): nothing else holds this parameter
            padded = torch.zeros(param.ds_tensor.numel(), dtype=torch.float32, device=local.device)
            padded[: rng.valid] = local
            safe_set_local_fp32_param(param, padded)
            moments = {key: _local_moment(param, key) for key in ("exp_avg", "exp_avg_sq")}
            if any(m is None for m in moments.values()):
                continue  # the optimizer has not stepped yet: no moments to reset
            reset_adam_moments(moments, reset_policy)
            if reset_policy != "none":
                for key, moment in moments.items():
                    safe_set_local_optimizer_state(param, moment, key)


_HELD_BY_EVENT = -1  # an entry of ds_active_sub_modules no module's ds_id can equal


def check_leaf_modules(model: nn.Module) -> None:
    """With `zero_optimization.stage3_module_granularity_threshold`, DeepSpeed fetches whole subtrees as ZeRO-3 leaves
    and releases them with `free_data=False`. A prune event (and `exert-ds analyze energy`) calls the embedding and
    each decoder block on its own, so then only whole decoder blocks may be leaves: any other leaf (the whole model,
    part of a block) is a ConfigError naming it and the range the threshold must lie in. DeepSpeed's
    `ds_model_granularity` (a module's parameters per submodule, set on every module only when the threshold is) gives
    the range: at least the blocks' largest, below the smallest of the modules that contain a block. Leaves from
    `zero_optimization.leaf_module` alone (no threshold) are released normally and are left as they are."""
    if not hasattr(model, "ds_model_granularity"):
        return
    names = {id(module): name for name, module in model.named_modules()}
    blocks = list(decoder_layers(model))
    block_names = [names[id(block)] for block in blocks]
    need = max(block.ds_model_granularity for block in blocks)
    upper = min(
        module.ds_model_granularity
        for name, module in model.named_modules()
        if name not in block_names and any(b.startswith(f"{name}.") or not name for b in block_names)
    )
    for name, module in model.named_modules():
        if z3_leaf_module(module) and name not in block_names:
            fix = f"set it to at least {need} and below {upper}" if need < upper else "leave it out"
            raise ConfigError(
                f"zero_optimization.stage3_module_granularity_threshold makes {name or 'the whole model'} a ZeRO-3 leaf "
                f"module; a prune event calls the decoder blocks one by one, so only they may be leaves: {fix}"
            )


@contextmanager
def gathered_for_pass(block: nn.Module) -> Iterator[None]:
    """Gather `block`'s parameters once and keep them gathered across the forward calls of one pass.

    Without a valid trace, as in a prune event (blocks called one by one, not in training order), ZeRO-3's hooks
    release a module's parameters after every call: a pass over 16 calibration micro-batches gathered each weight
    16 times. The hooks release a parameter only when no module is active on it (`ds_active_sub_modules`), so an
    entry of our own holds it until the pass is over; GatheredParameters then partitions it again. Costs one whole
    block in memory for the pass.

    A block that ZeRO-3 fetches as one leaf (`stage3_module_granularity_threshold`) is made an ordinary module for the
    pass: DeepSpeed 0.19.8 releases a leaf's parameters with `free_data=False`, which replaces their data by a 1-element
    buffer even when another holder keeps them active, so the second call of the pass read a placeholder. As an
    ordinary module its hooks fetch and release only its own direct parameters (none for a decoder block), and the
    gathered ones stay as they are."""
    params = list(block.parameters())
    leaf = z3_leaf_module(block)
    with deepspeed.zero.GatheredParameters(params):
        for param in params:
            param.ds_active_sub_modules.add(_HELD_BY_EVENT)
        if leaf:
            set_z3_leaf_module(block, False)
        try:
            yield
        finally:
            if leaf:
                set_z3_leaf_module(block, True)
            for param in params:
                param.ds_active_sub_modules.discard(_HELD_BY_EVENT)


class Zero3Backend:
    """All ranks of the default process group; tensors reduced on the accelerator."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = torch.device(get_accelerator().current_device_name())

    def linear(self, layer: LoraLayer) -> Zero3Linear:
        return Zero3Linear(layer, self.device)

    def whole_block(self, block: nn.Module) -> AbstractContextManager[None]:
        return gathered_for_pass(block)

    def all_reduce(self, tensor: Tensor) -> Tensor:
        if tensor.device == self.device:
            dist.all_reduce(tensor)
            return tensor
        on_device = tensor.to(self.device)
        dist.all_reduce(on_device)
        return tensor.copy_(on_device)
