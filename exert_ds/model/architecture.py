"""Where the seven projection roles live in a Hugging Face causal LM, and its attention geometry.

One table per family; an unknown architecture fails with one line naming its class. PEFT-wrapped models
are unwrapped, so the same map serves the dense model, the LoRA model and the DeepSpeed engine's module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from exert_ds.roles import ROLE_TABLES, ROLES


@dataclass(frozen=True)
class Geometry:
    """Attention and MLP geometry of the decoder (identical in every block of these families)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a DeepSpeed engine and/or a PEFT wrapper."""
    model = getattr(model, "module", model)  # DeepSpeedEngine
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()  # PeftModel → LlamaForCausalLM etc.
    return model


def role_table(model: nn.Module) -> dict[str, str]:
    """role → module path in a decoder layer; one-line error for architectures we do not know."""
    hf = unwrap(model)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    if model_type not in ROLE_TABLES:
        known = ", ".join(sorted(ROLE_TABLES))
        raise ValueError(
            f"exert_ds does not know the architecture {type(hf).__name__} (model_type={model_type!r}); "
            f"supported model types: {known}"
        )
    return ROLE_TABLES[model_type]


def decoder_stack(model: nn.Module) -> nn.Module:
    """The decoder without the LM head (`LlamaModel` etc.): embeddings, rotary, the layers, the final norm."""
    decoder_layers(model)  # one-line error for a model without .model.layers
    return unwrap(model).model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    hf = unwrap(model)
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(hf).__name__} has no decoder layers at .model.layers; exert_ds cannot map it")
    return layers


def block_linears(model: nn.Module, block: int) -> dict[str, nn.Module]:
    """role → the (possibly LoRA-wrapped) linear module of one decoder block."""
    table = role_table(model)
    layer = decoder_layers(model)[block]
    found: dict[str, nn.Module] = {}
    for role in ROLES:
        try:
            found[role] = layer.get_submodule(table[role])
        except AttributeError as err:
            raise ValueError(
                f"{type(unwrap(model)).__name__} block {block} has no {table[role]} for role {role!r}"
            ) from err
    return found


def geometry(model: nn.Module) -> Geometry:
    cfg = unwrap(model).config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return Geometry(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, heads, kv_heads, head_dim)


def target_module_names(model: nn.Module, roles: tuple[str, ...] = ROLES) -> list[str]:
    """Leaf module names for PEFT's `LoraConfig.target_modules` (default: all seven roles)."""
    table = role_table(model)
    return [table[role].rsplit(".", 1)[-1] for role in roles]
