"""Open a sharded sparse expert directory (exert_ds.storage.expert) as a model for evaluation, without exporting it.

The model is built from the directory's config.json (random init; partitioned as it is created under a ZeRO-3
config) and the expert's tensors are copied in one full tensor at a time: under ZeRO-3 only rank 0 reads the
files and writes each tensor into the gathered parameter (GatheredParameters with modifier_rank=0), which
re-partitions it; rank 0 tells the others, tensor by tensor, whether the read succeeded, so a damaged expert
stops every rank with the same one-line error instead of leaving them waiting in a gather.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig

from exert_ds.config import ModelConfig
from exert_ds.errors import ConfigError
from exert_ds.storage.expert import read_manifest, read_tensor, verify_files


def promised_sparsity(manifest: dict) -> float | list[float] | None:
    """The sparsity the expert's prune schedule promised: (M−N)/M for N:M, one per decoder block for an OWL
    allocation (the promise's "blocks"), else the unstructured target."""
    promise = manifest.get("promise", {})
    if promise.get("blocks"):
        return list(promise["blocks"])
    if promise.get("m"):
        return (promise["m"] - promise["n"]) / promise["m"]
    return promise.get("sparsity") or None


def _broadcast(obj: Any) -> Any:
    """Rank 0's object on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def load_expert_model(
    cfg: ModelConfig, ds_config: dict[str, Any] | None
) -> tuple[PreTrainedModel, HfDeepSpeedConfig | None, float | list[float] | None]:
    """(model, the HfDeepSpeedConfig to keep alive, promised sparsity) of the expert directory cfg.name_or_path."""
    path = cfg.name_or_path
    zero3 = ds_config is not None
    rank = dist.get_rank() if dist.is_initialized() else 0
    reads = rank == 0 or not zero3
    error = None
    if reads:
        try:  # the manifest and every file's sha256 (config.json included) before anything is read
            verify_files(path, read_manifest(path))
        except ConfigError as err:
            error = str(err)
    if zero3:
        error = _broadcast(error)
    if error:
        raise ConfigError(error)
    manifest = read_manifest(path)
    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config is not None else None
    config = AutoConfig.from_pretrained(path)
    if cfg.attn_implementation:
        config._attn_implementation = cfg.attn_implementation
    init = deepspeed.zero.Init(config_dict_or_path=ds_config) if zero3 else contextlib.nullcontext()
    with init:
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.dtype))
    params = dict(model.named_parameters())
    loaded = set()
    for name in manifest["tensors"]:
        tensor = None
        if reads:
            try:
                tensor = read_tensor(Path(path), manifest, name)
                shape = tuple(getattr(params[name], "ds_shape", params[name].shape)) if name in params else None
                if shape != tuple(tensor.shape):
                    error = f"{path}: tensor {name} does not belong to the {type(model).__name__} of its config.json"
            except ConfigError as err:
                error = str(err)
        if zero3:
            error = _broadcast(error)
        if error:
            raise ConfigError(error)
        param = params[name]
        if zero3:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    param.copy_(tensor)
        else:
            param.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ConfigError(
            f"{path}: the expert holds no tensor for {', '.join(missing[:3])}; it does not match its config"
        )
    model.config.use_cache = False
    return model, keep_alive, promised_sparsity(manifest)
