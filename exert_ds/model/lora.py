"""LoRA through PEFT: attach adapters to the seven roles, read a LoRA linear's pieces, re-draw A.

The re-initialisation of A after an event uses PEFT's default (Kaiming-uniform, a = √5) drawn from a
generator seeded by (run seed, event, block, role), so every rank and every resume draws the same A.
"""

from __future__ import annotations

import hashlib
import math

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from exert_ds.model.architecture import block_linears, target_module_names
from exert_ds.roles import ROLES


def attach_lora(
    model: nn.Module, lora_kwargs: dict, roles: tuple[str, ...] = ROLES, adapter_dtype: str = "model"
) -> nn.Module:
    """Wrap `model` with PEFT LoRA; `lora_kwargs` are LoraConfig's own fields (r, lora_alpha, ...).
    Without `target_modules` there, LoRA goes on the projections of `roles` (default: all seven). `adapter_dtype`
    (train.adapter_dtype): "float32" keeps PEFT's default (a bf16/fp16 model's adapters are cast to float32, so each
    projection casts its input to float32 and keeps that copy for backward), "model" holds them in the model's dtype
    (PEFT's `autocast_adapter_dtype=False`)."""
    kwargs = {"task_type": "CAUSAL_LM", "target_modules": target_module_names(model, roles), **lora_kwargs}
    return get_peft_model(model, LoraConfig(**kwargs), autocast_adapter_dtype=adapter_dtype == "float32")


def lora_layer(module: nn.Module, role: str) -> LoraLayer:
    if not isinstance(module, LoraLayer):
        raise ValueError(f"role {role!r} has no LoRA adapter ({type(module).__name__}); add it to lora.target_modules")
    return module


def lora_parts(module: LoraLayer) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, float]:
    """(W, A, B, s) of the active adapter: base weight out×in, A r×in, B out×r, s = lora_alpha / r."""
    name = module.active_adapters[0]
    return (
        module.get_base_layer().weight,
        module.lora_A[name].weight,
        module.lora_B[name].weight,
        float(module.scaling[name]),
    )


def block_lora_layers(model: nn.Module, block: int) -> dict[str, LoraLayer]:
    return {role: lora_layer(module, role) for role, module in block_linears(model, block).items()}


def adapter_seed(run_seed: int, event: int, block: int, role: str) -> int:
    """A 63-bit seed from (run seed, event, block, role): stable across processes, ranks and resumes."""
    digest = hashlib.sha256(f"{run_seed}:{event}:{block}:{role}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fresh_lora_a(shape: tuple[int, int], seed: int) -> Tensor:
    """PEFT's default A init (kaiming_uniform_, a=√5) from a seeded CPU generator, in float32."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.empty(shape, dtype=torch.float32)
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
