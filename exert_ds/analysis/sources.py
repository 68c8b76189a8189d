"""The weights of a model on disk, one tensor at a time: a sparse expert (storage/expert.py, per-rank files) or a
Hugging Face directory (model.safetensors, or shards + index). Nothing reads a whole model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from exert_ds.errors import ConfigError
from exert_ds.roles import ROLE_TABLES, ROLES
from exert_ds.storage.expert import read_tensor, verify_files
from exert_ds.storage.manifest import is_expert_dir, read_expert_manifest

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
GEOMETRY_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")


def parse_roles(text: str | None) -> tuple[str, ...]:
    """`q,k,down` → ("q", "k", "down"); None or empty → all seven. ConfigError naming an unknown role."""
    if not text:
        return ROLES
    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ConfigError(f"--roles: unknown role {unknown[0]!r}; choose among {', '.join(ROLES)}")
    return roles


@dataclass
class WeightSource:
    """A model on disk. `kind`: "expert" or "hf"; `config`: its config.json; `shapes`: tensor name → shape."""

    path: Path
    kind: str
    config: dict
    shapes: dict[str, tuple[int, ...]]
    _manifest: dict | None = None
    _files: dict[str, Path] = field(default_factory=dict)  # hf: tensor name → safetensors file

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def role_name(self, block: int, role: str) -> str:
        """The Hugging Face name of one projection's weight, e.g. `model.layers.3.mlp.up_proj.weight`."""
        return f"model.layers.{block}.{ROLE_TABLES[self.config['model_type']][role]}.weight"

    def tensor(self, name: str) -> Tensor:
        """One full tensor (the dtype stored), read alone: an expert's fragments are assembled from the rank files
        and its sparsity promise checked; an HF shard is memory-mapped only for this read."""
        if name not in self.shapes:
            raise ConfigError(f"{self.path} has no tensor {name}")
        if self.kind == "expert":
            return read_tensor(self.path, self._manifest, name, check=True)
        with safe_open(self._files[name], framework="pt") as fh:
            return fh.get_tensor(name)


def _config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"{file} is missing; give a sparse expert or a Hugging Face model directory")
    config = json.loads(file.read_text())
    if config.get("model_type") not in ROLE_TABLES:
        raise ConfigError(
            f"{file}: model_type {config.get('model_type')!r} is not one exert_ds maps; "
            f"supported: {', '.join(sorted(ROLE_TABLES))}"
        )
    return config


def open_source(path: str | Path) -> WeightSource:
    """Open a sparse expert or an HF directory (checking an expert's sha256 of every file first)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; give a sparse expert or a Hugging Face model directory")
    config = _config(path)
    if is_expert_dir(path):
        manifest = read_expert_manifest(path)
        verify_files(path, manifest)
        shapes = {name: tuple(e["shape"]) for name, e in manifest["tensors"].items()}
        return WeightSource(path, "expert", config, shapes, manifest)
    if (path / HF_INDEX).is_file():
        weight_map = json.loads((path / HF_INDEX).read_text())["weight_map"]
        files = {name: path / file for name, file in weight_map.items()}
    elif (path / HF_SINGLE).is_file():
        files = {}
        with safe_open(path / HF_SINGLE, framework="pt") as fh:
            files = dict.fromkeys(fh.keys(), path / HF_SINGLE)
    else:
        raise ConfigError(f"{path}: no {HF_SINGLE}, {HF_INDEX} or expert manifest; give a model directory")
    shapes = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as fh:
            shapes |= {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}
    return WeightSource(path, "hf", config, shapes, None, files)


def check_same_model(sources: list[WeightSource]) -> None:
    """ConfigError unless every source has the first one's architecture and the same projection shapes."""
    first = sources[0]
    for other in sources[1:]:
        for key in GEOMETRY_KEYS:
            if first.config.get(key) != other.config.get(key):
                raise ConfigError(
                    f"{other.path} is another model than {first.path}: {key} {other.config.get(key)!r} against "
                    f"{first.config.get(key)!r}; compare experts of one base model"
                )
        for block in range(first.num_layers):
            for role in ROLES:
                name = first.role_name(block, role)
                if first.shapes.get(name) != other.shapes.get(name):
                    raise ConfigError(
                        f"{other.path}: {name} has shape {other.shapes.get(name)}, {first.path} has "
                        f"{first.shapes.get(name)}; compare experts of one base model"
                    )


def projection_weight(source: WeightSource, block: int, role: str) -> Tensor:
    """One projection's weight (out × in) in float32 (float64 stays float64)."""
    weight = source.tensor(source.role_name(block, role))
    return weight.to(torch.promote_types(weight.dtype, torch.float32))
