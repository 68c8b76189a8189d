"""LoRA adapters read back per (block, role) as (A, B) in float32: from a saved PEFT adapter directory
(adapter_model.safetensors, as `save_pretrained` and `train.save_event_adapters` write it) or from a training
checkpoint (storage/checkpoint.py: every rank file holds its slice of each LoRA fp32 master; the manifest's
ranges say which flat elements each rank holds, and the slices are put back together here).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from exert_ds.errors import ConfigError
from exert_ds.roles import ROLE_TABLES
from exert_ds.storage.manifest import CHECKPOINT_MANIFEST as MANIFEST
from exert_ds.storage.manifest import LATEST, checkpoint_rank_file

ADAPTER_FILE = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_ROLE_OF_PATH = {path: role for table in ROLE_TABLES.values() for role, path in table.items()}

Adapters = dict[tuple[int, str], tuple[Tensor, Tensor]]  # (block, role) → (A: r × in, B: out × r)


def _by_role(named: dict[str, Tensor], where: Path) -> Adapters:
    """PEFT parameter names (with or without the adapter name) → (block, role) → (A, B)."""
    parts: dict[tuple[int, str], dict[str, Tensor]] = {}
    for name, value in named.items():
        found = _LORA_KEY.search(name)
        if not found:
            continue
        block, path, which = int(found[1]), found[2], found[3]
        role = _ROLE_OF_PATH.get(path)
        if role is None:
            raise ConfigError(f"{where}: LoRA on {path} (in {name}) is not one of the seven projection roles")
        parts.setdefault((block, role), {})[which] = value.float()
    if not parts:
        raise ConfigError(f"{where} holds no LoRA A/B weights; give a PEFT adapter directory or a training checkpoint")
    incomplete = next((key for key, ab in parts.items() if set(ab) != {"A", "B"}), None)
    if incomplete:
        raise ConfigError(f"{where}: block {incomplete[0]} role {incomplete[1]} lacks its LoRA A or B")
    return {key: (ab["A"], ab["B"]) for key, ab in sorted(parts.items())}


def _checkpoint_dir(path: Path) -> Path | None:
    """The checkpoint `path` names: itself, or for a checkpoints root (or a run's output_dir) the one `latest` names."""
    for root in (path, path / "checkpoints"):
        if (root / MANIFEST).is_file():
            return root
        if (root / LATEST).is_file():
            return root / (root / LATEST).read_text().strip()
    return None


def _from_checkpoint(path: Path) -> Adapters:
    manifest = json.loads((path / MANIFEST).read_text())
    world = manifest["world_size"]
    files = []
    for rank in range(world):
        file = path / checkpoint_rank_file(rank)
        if not file.is_file():
            raise ConfigError(f"{file} is missing; the checkpoint {path} is incomplete")
        files.append(torch.load(file, weights_only=False, mmap=True, map_location="cpu")["trainable"])
    named = {}
    for name, entry in manifest["trainable"].items():
        flat = torch.empty(int(torch.Size(entry["shape"]).numel()), dtype=torch.float32)
        for rank, (start, end) in enumerate(entry["ranges"]):
            flat[start:end] = files[rank][name]["fp32"][: end - start].detach()
        named[name] = flat.view(entry["shape"])
    return _by_role(named, path)


def load_adapters(path: str | Path) -> Adapters:
    """(block, role) → (A, B) from a PEFT adapter directory, a training checkpoint, a checkpoints root or a run's
    output directory (its latest checkpoint). ConfigError naming the path when nothing there is an adapter."""
    path = Path(path)
    if (path / ADAPTER_FILE).is_file():
        return _by_role(load_file(path / ADAPTER_FILE), path)
    checkpoint = _checkpoint_dir(path) if path.is_dir() else None
    if checkpoint is not None and (checkpoint / MANIFEST).is_file():
        return _from_checkpoint(checkpoint)
    raise ConfigError(
        f"{path}: no {ADAPTER_FILE} and no training checkpoint there; give a PEFT adapter directory "
        "(e.g. output_dir/event_adapters/event-0) or a checkpoint (output_dir/checkpoints/step-…)"
    )
