"""The seven projection roles EfficientXpert prunes, and where they live in a decoder layer (no torch: the config
checks and `exert-ds inspect` read these tables without importing it).

Roles follow algorithm.md §1: attention q, k, v, o and MLP gate, up, down.
"""

from __future__ import annotations

ROLES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

# role → attribute path inside one decoder layer (LLaMA, Mistral, Qwen2 and Qwen3 share these names)
LLAMA_LIKE_ROLES: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
ROLE_TABLES: dict[str, dict[str, str]] = {
    "llama": LLAMA_LIKE_ROLES,
    "mistral": LLAMA_LIKE_ROLES,
    "qwen2": LLAMA_LIKE_ROLES,
    "qwen3": LLAMA_LIKE_ROLES,
}
# Roles that read the same input tensor: their statistics (E, H) are collected once per group.
STAT_GROUP: dict[str, str] = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}


def role_of(parameter_name: str, table: dict[str, str] = LLAMA_LIKE_ROLES) -> str | None:
    """The role whose module path is in a parameter name (`model.layers.3.mlp.up_proj.weight` → 'up'), or None."""
    return next((role for role, path in table.items() if f".{path}." in f".{parameter_name}."), None)
