"""The model an evaluation runs: loaded in one process, replicated on every rank, or partitioned as a DeepSpeed
ZeRO-3 inference engine (no optimizer) when a stage-3 config is given; plus the collectives the evaluation
needs (gather of per-example scores, in-place sum of statistics), which are no-ops in one process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from exert_ds.config import ModelConfig
from exert_ds.errors import ConfigError
from exert_ds.model.loading import load_model, load_tokenizer
from exert_ds.runtime.dist import init_distributed, launched_world_size, shutdown_distributed
from exert_ds.runtime.ds_config import load_ds_config
from exert_ds.runtime.zero3 import Zero3Backend
from exert_ds.storage.expert_model import load_expert_model
from exert_ds.storage.manifest import is_expert_dir


@dataclass
class Runtime:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: str  # "hf", "gguf", "expert" (a sharded sparse expert directory, exert_ds.storage.expert)
    rank: int = 0
    world: int = 1
    zero3: bool = False
    promised_sparsity: float | list[float] | None = None  # a list: one per decoder block (OWL)
    keep_alive: list[Any] = field(default_factory=list)  # engine, HfDeepSpeedConfig

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()

    @property
    def gather(self) -> Callable[[object], list] | None:
        if not self.distributed:
            return None

        def all_gather(obj: object) -> list:
            out: list = [None] * self.world
            dist.all_gather_object(out, obj)
            return out

        return all_gather

    @property
    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return Zero3Backend().all_reduce if self.distributed else None

    def log(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(text)

    def close(self) -> None:
        shutdown_distributed()


def inference_ds_config(path: str, world: int) -> dict[str, Any]:
    """The user's ZeRO-3 config (checked as for training) without optimizer and scheduler: inference only."""
    ds = load_ds_config(path, world)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    return ds


def merge_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """`model` with the PEFT LoRA adapter in directory `adapter` merged (W += s·B·A, PEFT's merge_and_unload)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"--adapter {adapter}: does not fit this model: {' '.join(str(err).split())[:300]}") from err


def model_kind(path: str) -> str:
    if path.endswith(".gguf"):
        return "gguf"
    return "expert" if is_expert_dir(path) else "hf"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def open_model(cfg: ModelConfig, deepspeed_config: str | None, adapter: str | None = None) -> Runtime:
    """Load the model for evaluation: ZeRO-3 partitioned with `deepspeed_config`, else whole on this device. `adapter`
    (not with ZeRO-3): a PEFT LoRA directory merged into the weights (dense: the promised sparsity no longer holds, so
    none is reported); an adapter that does not fit the model raises a one-line ConfigError."""
    world = launched_world_size()
    ds = inference_ds_config(deepspeed_config, world) if deepspeed_config else None
    if world > 1 or ds is not None:
        if world == 1 and "RANK" not in os.environ:  # ZeRO-3 in one process started without a launcher
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        init_distributed()
    rank = dist.get_rank() if dist.is_initialized() else 0
    kind = model_kind(cfg.name_or_path)
    keep: list[Any] = []
    promised = None
    if kind == "expert":  # its files (tokenizer's included) are checked before any is read
        model, keep_alive, promised = load_expert_model(cfg, ds)
        tokenizer = load_tokenizer(cfg)
    else:
        tokenizer = load_tokenizer(cfg)
        model, keep_alive = load_model(cfg, ds)
    keep.append(keep_alive)
    if adapter is not None:
        model, promised = merge_adapter(model, adapter), None
    if ds is not None:
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        keep.append(engine)
        model = engine.module
    elif get_accelerator().device_name() != "cpu":
        model = model.to(get_accelerator().current_device_name())
    model.eval()
    world_now = dist.get_world_size() if dist.is_initialized() else 1
    return Runtime(model, tokenizer, kind, rank, world_now, ds is not None, promised, keep)
