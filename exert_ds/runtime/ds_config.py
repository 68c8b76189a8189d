"""DeepSpeed's own JSON, read from a path or inlined in the run YAML, checked against the run before launch.

We keep DeepSpeed's names and let DeepSpeed's config classes validate the JSON itself; here we add the
checks that need the run: ZeRO stage 3 (the prune event works on ZeRO-3 partitions) and batch sizes that
multiply out at the launched world size.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

from exert_ds.errors import ConfigError


def read_ds_config(source: str | dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed JSON object, inlined in the run YAML or read from a file."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    if not isinstance(source, str):
        raise ConfigError(f"config key 'deepspeed' must be a path to a DeepSpeed JSON or its mapping, got {source!r}")
    path = Path(source)
    if not path.is_file():
        raise ConfigError(
            f"config key 'deepspeed': {source} is not a file; give a path to a DeepSpeed JSON or inline it"
        )
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object, got {type(ds).__name__}")
    return ds


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
    """DeepSpeed's own schema, as one rank: the types of its top-level scalar keys (the type of each key's default in
    deepspeed.runtime.constants), its config classes (pydantic models for zero_optimization, bf16, fp16, ...), and
    the optimizer and scheduler by the rules its engine applies later (a known type, parameters its class takes).
    Each fault is one ConfigError naming the key."""
    from deepspeed.runtime.config import DeepSpeedConfig

    _check_scalars(ds)
    one_rank = {
        **ds,
        "train_batch_size": ds["train_micro_batch_size_per_gpu"] * ds.get("gradient_accumulation_steps", 1),
    }
    try:
        DeepSpeedConfig(one_rank)
    except Exception as err:  # DeepSpeed raises pydantic, assertion and value errors
        raise ConfigError(f"DeepSpeed rejected the config: {_deepspeed_error(ds, err)}") from err
    _check_optimizer(ds)
    _check_scheduler(ds)


def _check_scalars(ds: dict[str, Any]) -> None:
    """Top-level keys that DeepSpeed reads as plain values (get_scalar_param) have the type of their default."""
    import deepspeed.runtime.constants as constants

    from exert_ds.validation import matches

    defaults = {
        getattr(constants, name): getattr(constants, f"{name}_DEFAULT")
        for name in dir(constants)
        if name.isupper() and isinstance(getattr(constants, name), str) and hasattr(constants, f"{name}_DEFAULT")
    }
    for key, value in ds.items():
        default = defaults.get(key)
        kind = {bool: bool, int: float, float: float, str: str}.get(type(default))
        if kind is not None and not matches(kind, value):
            name = {bool: "true or false", float: "a number", str: "a string"}[kind]
            raise ConfigError(f"DeepSpeed config key '{key}' must be {name}, got {type(value).__name__} {value!r}")


def _deepspeed_error(ds: dict[str, Any], err: Exception) -> str:
    """One line for DeepSpeed's error; a pydantic one names the key it is about (section.field...)."""
    import pydantic

    if not isinstance(err, pydantic.ValidationError):
        return " ".join(str(err).split())[:300]
    first = err.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    sections = [key for key, value in ds.items() if isinstance(value, dict) and _holds(value, first["loc"])]
    title = err.title.lower()  # e.g. DeepSpeedBF16Config: prefer the section it names when several hold the key
    sections.sort(key=lambda key: key.replace("_optimization", "").replace("_", "") not in title)
    path = f"{sections[0]}.{loc}" if sections else loc
    return f"key '{path}': {first['msg']}, got {first.get('input')!r} ({err.title})"


def _holds(section: dict, loc: tuple) -> bool:
    node: Any = section
    for part in loc[:-1]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, dict) and loc[-1] in node


def _check_optimizer(ds: dict[str, Any]) -> None:
    """`optimizer.type` is one of DeepSpeed's optimizers or a torch.optim class (the engine's rule); under ZeRO a
    torch.optim class DeepSpeed has not tested needs zero_allow_untested_optimizer; `optimizer.params` bind to the
    classes DeepSpeed may build for that type."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from deepspeed.runtime.config import ADAGRAD_OPTIMIZER, ADAM_OPTIMIZER, ADAMW_OPTIMIZER, DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    from exert_ds.validation import signature_problem

    optimizer = ds.get("optimizer")
    if optimizer is None:
        return
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("type"), str):
        raise ConfigError("DeepSpeed config key 'optimizer' must be a mapping with a 'type' string (e.g. AdamW)")
    name = optimizer["type"].lower() if optimizer["type"].lower() in DEEPSPEED_OPTIMIZERS else optimizer["type"]
    torch_names = [n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)]
    torch_class = getattr(torch.optim, name, None) if name not in DEEPSPEED_OPTIMIZERS else None
    if name not in DEEPSPEED_OPTIMIZERS and not isinstance(torch_class, type):
        close = difflib.get_close_matches(name, [*DEEPSPEED_OPTIMIZERS, *torch_names], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"DeepSpeed config key 'optimizer.type': {optimizer['type']!r} is not an optimizer DeepSpeed knows; {hint}"
            f"use one of {', '.join(DEEPSPEED_OPTIMIZERS)} or a torch.optim class name"
        )
    if torch_class is not None and torch_class not in ZERO_SUPPORTED_OPTIMIZERS:
        if not ds.get("zero_allow_untested_optimizer", False):
            raise ConfigError(
                f"DeepSpeed config key 'optimizer.type': ZeRO has not been tested with {name}; set "
                "'zero_allow_untested_optimizer: true' or use one of " + ", ".join(DEEPSPEED_OPTIMIZERS)
            )
    params = optimizer.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"DeepSpeed config key 'optimizer.params' must be a mapping, got {params!r}")
    candidates = {
        ADAM_OPTIMIZER: [FusedAdam, DeepSpeedCPUAdam, torch.optim.Adam],
        ADAMW_OPTIMIZER: [FusedAdam, DeepSpeedCPUAdam, torch.optim.AdamW],
        ADAGRAD_OPTIMIZER: [torch.optim.Adagrad],
    }.get(name, [torch_class] if torch_class is not None else [])
    own = {"torch_adam", "adam_w_mode"} if name in (ADAM_OPTIMIZER, ADAMW_OPTIMIZER) else set()
    given = {k: v for k, v in params.items() if k not in own}
    problems = [signature_problem("optimizer.params", cls, given) for cls in candidates]
    if candidates and all(problems):
        raise ConfigError(f"DeepSpeed config key {problems[-1]}")


def _check_scheduler(ds: dict[str, Any]) -> None:
    """`scheduler.type` is one of DeepSpeed's schedules or a torch.optim.lr_scheduler class (the engine's rule), and
    `scheduler.params` bind to its constructor."""
    import torch
    from deepspeed.runtime import lr_schedules

    from exert_ds.validation import signature_problem

    scheduler = ds.get("scheduler")
    if scheduler is None:
        return
    if not isinstance(scheduler, dict) or not isinstance(scheduler.get("type"), str):
        raise ConfigError("DeepSpeed config key 'scheduler' must be a mapping with a 'type' string (e.g. WarmupLR)")
    name = scheduler["type"]
    target = getattr(lr_schedules, name, None) if name in lr_schedules.VALID_LR_SCHEDULES else None
    target = target or getattr(torch.optim.lr_scheduler, name, None)
    if not isinstance(target, type):
        known = [*lr_schedules.VALID_LR_SCHEDULES]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"DeepSpeed config key 'scheduler.type': {name!r} is not a schedule DeepSpeed knows; {hint}use one of "
            f"{', '.join(known)} or a torch.optim.lr_scheduler class name"
        )
    params = scheduler.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"DeepSpeed config key 'scheduler.params' must be a mapping, got {params!r}")
    problem = signature_problem("scheduler.params", target, params)
    if problem:
        raise ConfigError(f"DeepSpeed config key {problem}")
