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
from deepspeed.utils import safe_get_local_optimizer_state, safe_set_local_fp32_param, safe_set_local_optimizer_state
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from exert_ds.model.lora import lora_parts
from exert_ds.runtime.access import RESET_POLICIES, reset_adam_moments
from exert_ds.runtime.shard import ShardRange, from_row_block, row_block, shard_range, valid_mask_of_block


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
        rows = torch.arange(self._range.row_start, self._range.row_end, device=self._device)
        first = rows * self.shape[1]
        return (first >= self._range.start) & (first < self._range.end)

    def weight_block(self) -> Tensor:
        values = local_values(self._w).to(self._device, torch.promote_types(self._w.ds_tensor.dtype, torch.float32))
        return row_block(values, self._range)

    def complete_rows(self, block: Tensor) -> Tensor:
        """Fill the partial first/last rows with the other ranks' fragments (zero where not held)."""
        rng, width = self._range, self.shape[1]
        sent = block.new_zeros(2, width + 1)
        sent[:, width] = -1  # row index of each fragment slot; -1 = empty
        partial = []
        if rng.num_rows and rng.first_row_partial:
            partial.append(0)
        if rng.num_rows and rng.last_row_partial and (rng.num_rows > 1 or not partial):
            partial.append(rng.num_rows - 1)
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
    def write_adapter(self, a: Tensor, b: Tensor, reset_policy: str) -> None:
        if reset_policy not in RESET_POLICIES:
            raise ValueError(f"optimizer.reset_after_prune={reset_policy!r}; choose one of {RESET_POLICIES}")
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


@contextmanager
def gathered_for_pass(block: nn.Module) -> Iterator[None]:
    """Gather `block`'s parameters once and keep them gathered across the forward calls of one pass.

    Without a valid trace, as in a prune event (blocks called one by one, not in training order), ZeRO-3's hooks
    release a module's parameters after every call: a pass over 16 calibration micro-batches gathered each weight
    16 times. The hooks release a parameter only when no module is active on it (`ds_active_sub_modules`), so an
    entry of our own holds it until the pass is over; GatheredParameters then partitions it again. Costs one whole
    block in memory for the pass."""
    params = list(block.parameters())
    with deepspeed.zero.GatheredParameters(params):
        for param in params:
            param.ds_active_sub_modules.add(_HELD_BY_EVENT)
        try:
            yield
        finally:
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
