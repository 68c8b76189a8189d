"""DeepSpeed's own JSON, read from a path or inlined in the run YAML, checked against the run before launch.

We keep DeepSpeed's names and let DeepSpeed's config classes validate the JSON itself; here we add the
checks that need the run: ZeRO stage 3 (the prune event works on ZeRO-3 partitions) and batch sizes that
multiply out at the launched world size.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from exert_ds.errors import ConfigError


def read_ds_config(source: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(
            f"config key 'deepspeed': {source} is not a file; give a path to a DeepSpeed JSON or inline it"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from err


def load_ds_config(source: str | dict[str, Any], world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for a run on `world_size` ranks, with train_batch_size filled in."""
    ds = read_ds_config(source)
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(
            f"DeepSpeed config: zero_optimization.stage is {stage!r}; exert_ds prunes ZeRO-3 partitions, set it to 3"
        )
    micro = ds.get("train_micro_batch_size_per_gpu")
    total = ds.get("train_batch_size")
    accumulation = ds.get("gradient_accumulation_steps", 1)
    if "gradient_accumulation_steps" not in ds and isinstance(total, int) and isinstance(micro, int) and micro > 0:
        # DeepSpeed's rule: train_batch_size and the micro batch fix the accumulation for this world size, so one
        # config keeps the global batch (and a checkpoint's trajectory) when the run resumes on another world size
        if total % (micro * world_size):
            raise ConfigError(
                f"DeepSpeed config: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} × world size "
                f"{world_size} × a whole number of gradient_accumulation_steps; change one of them"
            )
        accumulation = ds["gradient_accumulation_steps"] = total // (micro * world_size)
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accumulation)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"DeepSpeed config: {key} must be a positive integer, got {value!r}")
    if total is not None and total != micro * accumulation * world_size:
        raise ConfigError(
            f"DeepSpeed config: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} × "
            f"gradient_accumulation_steps {accumulation} × world size {world_size}; fix one or drop train_batch_size"
        )
    ds["train_batch_size"] = micro * accumulation * world_size
    check_with_deepspeed(ds)
    return ds


def check_with_deepspeed(ds: dict[str, Any]) -> None:
    """Run DeepSpeed's own config parsing (as one rank) and turn its errors into one line."""
    from deepspeed.runtime.config import DeepSpeedConfig

    one_rank = {
        **ds,
        "train_batch_size": ds["train_micro_batch_size_per_gpu"] * ds.get("gradient_accumulation_steps", 1),
    }
    try:
        DeepSpeedConfig(one_rank)
    except Exception as err:  # DeepSpeed raises pydantic, assertion and value errors
        first = " ".join(str(err).split())[:300]
        raise ConfigError(f"DeepSpeed rejected the config: {first}") from err
