"""Recovery after the final mask that keeps the sparsity (`prune.recovery_steps`, algorithm.md §8 c; issue 20).

After the final event (weights merged and masked, B = 0) the run takes K more optimizer steps in which every LoRA
linear computes

    y = W x + ((s · B A) ⊙ M) dropout(x),    M = (W ≠ 0)    (out × in)

instead of PEFT's W x + s · B (A dropout(x)): the adapter's product is masked before it is added, as SQFT does
(Muñoz et al., "SQFT: Low-cost Model Adaptation in Low-precision Sparse Foundation Models", EMNLP Findings 2024,
§3.2, sparsity-preserving merge). The base weight is frozen, so M is the final event's mask on every step. At the
end `merge_masked` writes W ← W + (s · B A) ⊙ M and B ← 0: the merged expert keeps exactly the final event's zeros,
and training saw exactly the model that is merged.

Cost: the dense (s · B A) ⊙ M of each adapted linear (out × in, in the adapter's dtype) is formed in its forward and
kept for backward, like the weight itself; with gradient checkpointing, one block's at a time. Under ZeRO-3 the
base weight and the adapter's A and B are registered as external parameters of the LoRA linear
(DeepSpeed's `register_external_parameter`), so the engine keeps all three whole for the linear's forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from deepspeed.runtime.zero.partition_parameters import register_external_parameter, unregister_external_parameter
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from exert_ds.errors import ConfigError
from exert_ds.model.architecture import decoder_layers
from exert_ds.model.lora import block_lora_layers, lora_parts
from exert_ds.runtime.access import Backend


def masked_adapter_delta(layer: LoraLayer) -> Tensor:
    """(s · B A) ⊙ (W ≠ 0): (out, in) in the adapter's dtype, differentiable in A and B. W must be whole (gathered)."""
    weight, a, b, scale = lora_parts(layer)
    return torch.where(weight != 0, (b @ a) * scale, torch.zeros((), dtype=a.dtype, device=a.device))


def _masked_forward(self: LoraLayer, x: Tensor, *args: object, **kwargs: object) -> Tensor:
    """The LoRA linear's forward during recovery: W x (+ bias) + ((s · B A) ⊙ M) dropout(x)."""
    result = self.base_layer(x, *args, **kwargs)
    delta = masked_adapter_delta(self)
    dropped = self.lora_dropout[self.active_adapters[0]](x)
    return (result + F.linear(dropped.to(delta.dtype), delta)).to(result.dtype)  # summed as PEFT sums, then cast


def mask_adapters(model: nn.Module) -> None:
    """Switch every LoRA linear of `model` to the masked forward (idempotent). Raises ConfigError for an adapter the
    masked product does not model (a PEFT LoRA variant such as DoRA, a LoRA bias, several active adapters)."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        name = layer.active_adapters[0]
        if len(layer.active_adapters) != 1 or name in layer.lora_variant or layer.lora_bias.get(name):
            raise ConfigError(
                "config key 'prune.recovery_steps' masks plain LoRA's product B·A only: drop lora.use_dora / "
                "lora.lora_bias, or set prune.recovery_steps: 0"
            )
        if getattr(layer.forward, "__func__", None) is _masked_forward:
            continue
        weight, a, b, _ = lora_parts(layer)
        for param in (weight, a, b):
            if hasattr(param, "ds_id"):  # ZeRO-3: gather it for this module's forward, not only its owner's
                register_external_parameter(layer, param)
        layer.forward = types.MethodType(_masked_forward, layer)


def unmask_adapters(model: nn.Module) -> None:
    """Undo `mask_adapters`: PEFT's own forward again, the external parameters unregistered (after the merge B = 0,
    so both forwards compute W x; PEFT's does not form the dense product)."""
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and getattr(layer.forward, "__func__", None) is _masked_forward:
            del layer.forward
            weight, a, b, _ = lora_parts(layer)
            for param in (weight, a, b):
                if hasattr(param, "ds_id"):
                    unregister_external_parameter(layer, param)


@torch.no_grad()
def merge_masked(model: nn.Module, backend: Backend) -> None:
    """W ← W + (s · B A) ⊙ (W ≠ 0) and B ← 0 for every LoRA linear of every block, on each process's own row block
    (elementwise: no row needs another rank's part). A and its optimizer moments are left as they are."""
    for block in range(len(decoder_layers(model))):
        for layer in block_lora_layers(model, block).values():
            acc = backend.linear(layer)
            a, b, scale = acc.adapter()  # A: (r, in), B: (out, r)
            w_block = acc.weight_block()  # (rows_held, in), zero where not held
            rows = slice(acc.row_start, acc.row_start + w_block.shape[0])
            acc.write_weight_block(torch.where(w_block != 0, w_block + scale * (b[rows] @ a), w_block))
            acc.write_adapter(a, torch.zeros_like(b), "none")
