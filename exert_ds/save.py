"""Write the merged (and pruned) model as a Hugging Face directory, gathering one tensor at a time.

Only rank 0 holds the growing state dict (in host memory); every other rank just takes part in the
gathers. The sharded sparse checkpoint format replaces this for large models.
"""

from __future__ import annotations

from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from exert_ds.architecture import unwrap


def base_parameter_name(peft_name: str) -> str:
    """`base_model.model.model.layers.0.mlp.up_proj.base_layer.weight` → `model.layers.0.mlp.up_proj.weight`."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@torch.no_grad()
def save_merged_hf(model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path | None:
    """Save the base weights (LoRA must already be merged: B = 0 after an event) as safetensors + config.
    Collective under ZeRO-3; returns the directory on rank 0, None elsewhere."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        with deepspeed.zero.GatheredParameters([param]):
            if rank == 0:
                state[base_parameter_name(name)] = param.detach().to("cpu", copy=True).contiguous()
    if rank != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    unwrap(model).config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
