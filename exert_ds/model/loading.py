"""Load the dense model and tokenizer (hub name, local HF directory or GGUF file), directly onto ZeRO-3.

A live `HfDeepSpeedConfig` makes `from_pretrained` build the model inside `deepspeed.zero.Init`, so a
model larger than one device is partitioned as it loads. GGUF files are dequantised by transformers.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import deepspeed
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations import HfDeepSpeedConfig

from exert_ds.config import ModelConfig
from exert_ds.errors import ConfigError


def _location(cfg: ModelConfig) -> tuple[str, str | None]:
    """(directory or hub name, gguf file name inside it or None)."""
    if cfg.name_or_path.endswith(".gguf"):
        path = Path(cfg.name_or_path)
        return str(path.parent), path.name
    return cfg.name_or_path, cfg.gguf_file


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    where, gguf = _location(cfg)
    source = cfg.tokenizer or where
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            gguf_file=None if cfg.tokenizer else gguf,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer {source!r} could not be loaded: {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _random_model(where: str, kwargs: dict[str, Any], ds_config: dict[str, Any] | None) -> PreTrainedModel:
    """Random weights in the architecture of `where`'s config.json, partitioned as they are created."""
    config = AutoConfig.from_pretrained(
        where, revision=kwargs["revision"], trust_remote_code=kwargs["trust_remote_code"]
    )
    if "attn_implementation" in kwargs:
        config._attn_implementation = kwargs["attn_implementation"]
    context = deepspeed.zero.Init(config_dict_or_path=ds_config) if ds_config else contextlib.nullcontext()
    with context:
        return AutoModelForCausalLM.from_config(
            config, dtype=kwargs["dtype"], trust_remote_code=kwargs["trust_remote_code"]
        )


def load_model(cfg: ModelConfig, ds_config: dict[str, Any] | None) -> tuple[PreTrainedModel, HfDeepSpeedConfig | None]:
    """The dense causal LM; with a ZeRO-3 `ds_config` it is partitioned while loading. Keep the returned
    HfDeepSpeedConfig alive as long as the model is used (transformers holds only a weak reference)."""
    where, gguf = _location(cfg)
    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config is not None else None
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, cfg.dtype),
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if gguf:
        kwargs["gguf_file"] = gguf
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        if cfg.init == "random":
            model = _random_model(where, kwargs, ds_config)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model {cfg.name_or_path!r} could not be loaded: {str(err).splitlines()[0]}") from err
    model.config.use_cache = False
    return model, keep_alive
