"""The run YAML's library sections checked against the libraries' own schemas, before any process group starts.

`lora:` against PEFT's `LoraConfig` (its dataclass fields and their type hints, then `LoraConfig(...)` itself),
`model:` against what `from_pretrained` accepts (transformers' registered attention implementations), and the
output folder for being a writable directory. DeepSpeed's JSON is checked by runtime/ds_config.py. Every fault
is one ConfigError line naming the key or path and what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from exert_ds.errors import ConfigError


def matches(hint: Any, value: Any) -> bool:
    """Whether `value` (as YAML or JSON gives it) fits the type hint `hint`: bool, int, float (an int too), str,
    Literal, Optional/Union, list/tuple/dict of such, a dataclass given as a mapping of its fields. A hint this does
    not know (a class, Any) is left to the library. A Literal option with a placeholder, such as PEFT's
    'pissa_niter_[number of iters]', takes the strings that fill it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches(option, value) for option in args)
    if origin is typing.Literal:
        return value in args or (isinstance(value, str) and any(_pattern(a).fullmatch(value) for a in args))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(a, v) for a, v in zip(args, value, strict=True))
        return not args or all(matches(args[0], v) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and (
            not args or all(matches(args[0], k) and matches(args[1], v) for k, v in value.items())
        )
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint) or (isinstance(value, dict) and _dataclass_problem(hint, value, "") is None)
    return True


def _pattern(option: Any) -> re.Pattern:
    """A Literal option as a pattern: a '[...]' placeholder (PEFT's 'pissa_niter_[number of iters]') stands for
    any text; any other option only for itself."""
    return re.compile(re.sub(r"\\\[.*?\\\]", ".+", re.escape(option)) if isinstance(option, str) else "(?!)")


def _type_name(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
    return (text or str(hint).replace("typing.", "")).replace("NoneType", "null")


def _dataclass_problem(cls: type, raw: dict, where: str) -> str | None:
    """The first key of `raw` that is not a field of dataclass `cls`, or whose value does not fit its hint."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{path.rsplit('.', 1)[0]}.{close[0]}'? " if close and where else ""
            return f"config key '{path}' is not a field of {cls.__name__}; {hint}its fields: {', '.join(names)}"
        if not matches(hints[key], value):
            return (
                f"config key '{path}' must be {_type_name(hints[key])} ({cls.__name__}), "
                f"got {type(value).__name__} {value!r}"
            )
    return None


def check_lora(section: dict[str, Any]) -> None:
    """`lora:` as PEFT reads it: every key a `LoraConfig` field of the right type, then `LoraConfig` built from it
    (its own checks: r, dropout, init and pattern values)."""
    from peft import LoraConfig

    problem = _dataclass_problem(LoraConfig, section, "lora")
    if problem:
        raise ConfigError(problem.replace("LoraConfig", "PEFT's LoraConfig", 1))
    try:
        LoraConfig(task_type="CAUSAL_LM", **section)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"config section 'lora': PEFT's LoraConfig rejects it: {' '.join(str(err).split())}") from err


def attention_implementations() -> list[str]:
    """The `attn_implementation` names transformers registers (eager, sdpa, flash/flex attention, paged|...)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return sorted({"eager", *ALL_ATTENTION_FUNCTIONS.keys()})


def check_model(attn_implementation: str | None) -> None:
    """`model:` values that `from_pretrained` would reject only after the process group started and the weights
    began to load. A name with '/' is a hub kernel repository, which transformers fetches itself."""
    if attn_implementation is None or "/" in attn_implementation:
        return
    known = attention_implementations()
    if attn_implementation not in known:
        close = difflib.get_close_matches(attn_implementation, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"config key 'model.attn_implementation': {attn_implementation!r} is not an attention implementation "
            f"transformers knows; {hint}known: {', '.join(known)}"
        )


def check_output_dir(key: str, path: str) -> None:
    """`path` is, or can be made as, a directory this process may write in; nothing is created here."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"config key '{key}': {path} exists and is not a directory; give a directory")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"config key '{key}': {existing} is a file, so {path} cannot be made; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"config key '{key}': {existing} is not writable by this user; give a writable directory")


def signature_problem(where: str, target: Any, params: dict[str, Any], skip: int = 1) -> str | None:
    """Whether `params` bind to `target`'s signature (its first `skip` positional parameters supplied by the
    library: the optimizer's parameters, the scheduler's optimizer), each value of the type of the parameter's
    annotation or default. None when they do."""
    signature = inspect.signature(target)
    accepted = list(signature.parameters.values())[skip:]
    by_name = {p.name: p for p in accepted if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in accepted)
    for key, value in params.items():
        parameter = by_name.get(key)
        if parameter is None:
            if takes_any:
                continue
            close = difflib.get_close_matches(key, by_name, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            return f"'{where}.{key}' is not a parameter of {_name(target)}; {hint}it takes {', '.join(by_name)}"
        hint = _parameter_hint(parameter)
        if hint is not None and not matches(hint, value):
            return f"'{where}.{key}' must be {_type_name(hint)} ({_name(target)}), got {type(value).__name__} {value!r}"
    missing = [p.name for p in by_name.values() if p.default is p.empty and p.name not in params]
    if missing:
        return f"'{where}' lacks {', '.join(missing)}, required by {_name(target)}"
    return None


def _name(target: Any) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def _parameter_hint(parameter: inspect.Parameter) -> Any:
    """The plain type a parameter takes: its annotation when that is bool/int/float/str, else its default's type
    (a number default takes any number; None or no default: no check)."""
    annotation = parameter.annotation
    if annotation in (bool, int, float, str):
        return float if annotation is int and isinstance(parameter.default, float) else annotation
    default = parameter.default
    if default is parameter.empty or default is None:
        return None
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float
    if isinstance(default, str):
        return str
    if isinstance(default, tuple) and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in default):
        return tuple[(float,) * len(default)]
    return None
