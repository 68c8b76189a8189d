"""Tiny random causal LMs (GQA, odd sizes) and LoRA adapters with non-zero B, for CPU tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from exert_ds.model.lora import attach_lora

FAMILIES = {
    # 3 query heads per KV head, hidden not a power of two, odd FFN
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 70},
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        {"hidden_size": 36, "num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 52},
    ),
    # head_dim (10) ≠ hidden / heads (8): q is 40×32, o is 32×40
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        {
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 10,
            "intermediate_size": 45,
        },
    ),
    # o, gate, up, down have odd row counts: on 2 ranks their rows straddle partitions, the last one padded
    "llama-odd": (
        LlamaConfig,
        LlamaForCausalLM,
        {"hidden_size": 45, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 4, "intermediate_size": 47},
    ),
    # issue 21's input: on 2 ranks rows of o/gate/up/down straddle the partition boundary, every odd tensor padded
    "llama-63": (
        LlamaConfig,
        LlamaForCausalLM,
        {"hidden_size": 63, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 4, "intermediate_size": 71},
    ),
    # every projection's input width a multiple of 4: N:M 2:4 applies to all seven
    "llama-24": (
        LlamaConfig,
        LlamaForCausalLM,
        {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 72},
    ),
    # on 3 ranks every matrix straddles, q/k/v included (20 and 4 rows of 35)
    "llama-3rank": (
        LlamaConfig,
        LlamaForCausalLM,
        {"hidden_size": 35, "num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": 4, "intermediate_size": 33},
    ),
}


def tiny_model(family: str = "llama", layers: int = 2, vocab: int = 96, dtype=torch.float32, seed: int = 0):
    config_cls, model_cls, dims = FAMILIES[family]
    config = config_cls(
        vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=128, tie_word_embeddings=False, **dims
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_cls(config).to(dtype)


def tiny_lora_model(
    family: str = "llama", layers: int = 2, r: int = 4, dtype=torch.float32, seed: int = 0, vocab: int = 96
):
    """A tiny model with LoRA on all seven roles and a random (trained-looking) B."""
    model = attach_lora(tiny_model(family, layers, vocab=vocab, dtype=dtype, seed=seed), {"r": r, "lora_alpha": 2 * r})
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.05)
    return model


def calibration_ids(n: int = 6, length: int = 12, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def event_config(
    pbs_mode: str = "hessian",
    seed: int = 0,
    reset_after_prune: str = "none",
    micro_batch: int = 4,
    at_final: bool = False,
    **prune,
):
    """A RunConfig holding what a prune event reads: `prune` keys (sparsity, scorer, n, m, ema_eta), `pbs.mode`,
    `train.seed`, `train.reset_after_prune`, `calibration.micro_batch`."""
    from exert_ds.config import CalibrationConfig, PBSConfig, PruneConfig, RunConfig, TrainConfig

    return RunConfig(
        prune=PruneConfig(**prune),
        pbs=PBSConfig(mode=pbs_mode, at_final=at_final),
        train=TrainConfig(seed=seed, reset_after_prune=reset_after_prune),
        calibration=CalibrationConfig(micro_batch=micro_batch),
    )
