"""`train.save_event_adapters`: keep the adapter each prune event merges, before the event re-initialises it.

The event already gathers every block's LoRA A and B (zero3.md, step 2); PruneEvent hands them to this writer
(`adapter_sink`), rank 0 keeps a float32 host copy, and after the event writes them as a PEFT adapter directory
(adapter_model.safetensors with PEFT's key names + adapter_config.json; `PeftModel.from_pretrained` loads it)
under output_dir/event_adapters/event-K, atomically. Host memory on rank 0: one float32 copy of the adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import Tensor, nn

from exert_ds.storage.atomic import publish, temporary_sibling

FOLDER = "event_adapters"


def event_adapter_dir(output_dir: str | Path, event: int) -> Path:
    return Path(output_dir) / FOLDER / f"event-{event}"


class EventAdapterWriter:
    """Collects the gathered adapters of one event (rank 0 keeps them) and writes them after it."""

    def __init__(self, peft_model: nn.Module, output_dir: str | Path, rank: int) -> None:
        self._peft = peft_model
        self._names = {id(m): name for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
        self._output_dir = Path(output_dir)
        self._rank = rank
        self._tensors: dict[str, Tensor] = {}
        self._event: int | None = None

    def __call__(self, event: int, block: int, layers: dict[str, LoraLayer], adapters: dict[str, tuple]) -> None:
        if self._rank != 0:
            return
        self._event = event
        for role, layer in layers.items():
            a, b, _scale = adapters[role]
            name = self._names[id(layer)]
            self._tensors[f"{name}.lora_A.weight"] = a.detach().to("cpu", torch.float32, copy=True).contiguous()
            self._tensors[f"{name}.lora_B.weight"] = b.detach().to("cpu", torch.float32, copy=True).contiguous()

    def write(self) -> Path | None:
        """Rank 0: publish the collected event's adapter; returns its directory (None on other ranks)."""
        if self._rank != 0 or self._event is None:
            return None
        final = event_adapter_dir(self._output_dir, self._event)
        tmp = temporary_sibling(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(self._tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        self._peft.peft_config[self._peft.active_adapter].save_pretrained(tmp)
        self._tensors, self._event = {}, None
        return publish(tmp, final)
