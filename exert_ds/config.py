"""The run YAML: typed sections, checked before any process group starts.

Section and key names follow the libraries they configure: `lora:` holds PEFT `LoraConfig` fields,
`deepspeed:` is DeepSpeed's own JSON (a path or inlined), `model:` uses `from_pretrained` argument names.
Every mistake is one line naming the key and the fix (unknown keys get a "did you mean").
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exert_ds.data import DataSource
from exert_ds.errors import ConfigError
from exert_ds.model.architecture import LLAMA_LIKE_ROLES
from exert_ds.prune.event import PBS_MODES, SCORERS
from exert_ds.prune.foresight import ROLES
from exert_ds.prune.pbs import MATMUL_PRECISIONS

DTYPES = ("float32", "bfloat16", "float16")
BOOKKEEPING_KEYS = ("log_every", "save_every_steps", "keep_checkpoints")  # train.* keys a resume may change


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false are booleans, so `pbs: {mode: off}` stays the string 'off'
    (YAML 1.1 reads off/on/yes/no as booleans, which PyYAML follows)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str) -> Any:
    """The run YAML's and `--set` values' parser (YAML 1.2 booleans)."""
    return yaml.load(text, Loader=_Yaml12Loader)


@dataclass
class ModelConfig:
    name_or_path: str = ""  # hub name, local HF directory, or a .gguf file
    gguf_file: str | None = None  # with a directory: the GGUF file inside it
    tokenizer: str | None = None  # defaults to the model's own
    dtype: str = "bfloat16"
    attn_implementation: str | None = None  # sdpa, eager, flash_attention_2 (HF names)
    revision: str | None = None
    trust_remote_code: bool = False
    init: str = "pretrained"  # "random": build from the config.json alone (scale tests with random weights)


@dataclass
class DataConfig:
    train: list[DataSource] = field(default_factory=list)
    seq_len: int = 512
    packing: bool = True


@dataclass
class CalibrationConfig:
    sources: list[DataSource] = field(default_factory=list)  # empty: the training sources
    num_samples: int = 128
    seq_len: int = 2048
    micro_batch: int = 4


@dataclass
class PruneConfig:
    enabled: bool = True
    scorer: str = "foresight"
    sparsity: float = 0.5
    n: int = 0  # N:M pattern (0:0 = unstructured)
    m: int = 0
    every_steps: int | None = None  # None: the epoch schedule of algorithm.md §6
    start_step: int = 0
    ramp: str = "none"  # "cubic": Zhu & Gupta ramp from 0 to sparsity over the events
    ema_eta: float = 0.5


@dataclass
class PBSConfig:
    mode: str = "hessian"
    reg: float | None = None  # default per mode: 1e-2 (hessian, relative), 1e-8 (reference)
    keep_weight: float = 1.0
    matmul_precision: str = "highest"  # hessian mode's float32 products: highest (float32) | high (TF32 on CUDA)


@dataclass
class TrainConfig:
    epochs: int = 2
    max_steps: int | None = None  # cap on optimizer steps (None: epochs × steps per epoch)
    seed: int = 0
    output_dir: str = "runs/exert"
    log_every: int = 10
    gradient_checkpointing: bool = False
    reset_after_prune: str = "none"  # Adam moments after an event: none, zero, keep_v
    save_every_steps: int | None = None  # checkpoints also after every prune event and at the end
    keep_checkpoints: int = 2


@dataclass
class EvalConfig:
    perplexity: list[DataSource] = field(default_factory=list)  # held-out text; empty: no perplexity
    window: int = 256
    max_windows: int | None = 32
    micro_batch: int = 4


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: dict[str, Any] = field(
        default_factory=lambda: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
    )  # LoraConfig
    deepspeed: Any = "ds_configs/zero3_cpu.json"  # path to DeepSpeed's JSON, or the JSON inlined
    data: DataConfig = field(default_factory=DataConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    pbs: PBSConfig = field(default_factory=PBSConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def calibration_sources(self) -> list[DataSource]:
        return self.calibration.sources or self.data.train

    def fingerprint(self) -> str:
        """sha256 of the config as loaded, less the keys that only say how often to log or checkpoint: ties
        checkpoints to the run that wrote them."""
        fields = dataclasses.asdict(self)
        for key in BOOKKEEPING_KEYS:
            fields["train"].pop(key)
        blob = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and value types recursively."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{where or 'top level'}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (
                f"; did you mean '{(where + '.') if where else ''}{close[0]}'?"
                if close
                else f"; known: {', '.join(names)}"
            )
            raise ConfigError(f"config key '{path}' is unknown{hint}")
        values[key] = _convert(hints[key], value, path)
    return cls(**values)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise (
            errors[0]
            if len(errors) == 1
            else ConfigError(
                f"config key '{path}' must be one of {' | '.join(_type_name(o) for o in options)}, got {value!r}"
            )
        )
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value] if dataclasses.is_dataclass(item) and isinstance(value, dict) else value
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}' must be a list, got {type(value).__name__} {value!r}")
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"config key '{path}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: RunConfig, base_dir: Path) -> None:
    """Ranges, choices and files; DeepSpeed's own JSON is checked by `ds_config.load_ds_config`."""
    _check(
        bool(cfg.model.name_or_path), "config key 'model.name_or_path' is required (hub name, HF directory or .gguf)"
    )
    _check(
        cfg.model.init in ("pretrained", "random"),
        f"config key 'model.init' must be 'pretrained' or 'random', got {cfg.model.init!r}",
    )
    _check(cfg.model.dtype in DTYPES, f"config key 'model.dtype' must be one of {DTYPES}, got {cfg.model.dtype!r}")
    p = cfg.prune
    _check(p.scorer in SCORERS, f"config key 'prune.scorer' must be one of {SCORERS}, got {p.scorer!r}")
    _check(0.0 <= p.sparsity < 1.0, f"config key 'prune.sparsity' must be in [0, 1), got {p.sparsity}")
    if p.n or p.m:
        _check(0 < p.n < p.m, f"config keys 'prune.n'/'prune.m' need 0 < n < m (e.g. 2 and 4), got {p.n}:{p.m}")
    _check(
        p.every_steps is None or p.every_steps > 0, f"config key 'prune.every_steps' must be > 0, got {p.every_steps}"
    )
    _check(p.start_step >= 0, f"config key 'prune.start_step' must be >= 0, got {p.start_step}")
    _check(p.ramp in ("none", "cubic"), f"config key 'prune.ramp' must be 'none' or 'cubic', got {p.ramp!r}")
    _check(0.0 < p.ema_eta <= 1.0, f"config key 'prune.ema_eta' must be in (0, 1], got {p.ema_eta}")
    _check(cfg.pbs.mode in PBS_MODES, f"config key 'pbs.mode' must be one of {PBS_MODES}, got {cfg.pbs.mode!r}")
    _check(
        not (p.scorer == "sparsegpt" and cfg.pbs.mode != "off"),
        "prune.scorer 'sparsegpt' updates the weights itself: set 'pbs.mode: off'",
    )
    _check(cfg.pbs.reg is None or cfg.pbs.reg >= 0, f"config key 'pbs.reg' must be >= 0, got {cfg.pbs.reg}")
    _check(
        0.0 <= cfg.pbs.keep_weight <= 1.0, f"config key 'pbs.keep_weight' must be in [0, 1], got {cfg.pbs.keep_weight}"
    )
    _check(
        cfg.pbs.matmul_precision in MATMUL_PRECISIONS,
        f"config key 'pbs.matmul_precision' must be one of {MATMUL_PRECISIONS}, got {cfg.pbs.matmul_precision!r}",
    )
    _check_lora(cfg)
    c, t = cfg.calibration, cfg.train
    for key, value in (
        ("calibration.num_samples", c.num_samples),
        ("calibration.seq_len", c.seq_len),
        ("calibration.micro_batch", c.micro_batch),
        ("data.seq_len", cfg.data.seq_len),
        ("train.epochs", t.epochs),
        ("train.log_every", t.log_every),
        ("eval.window", cfg.eval.window),
        ("train.keep_checkpoints", t.keep_checkpoints),
        ("eval.micro_batch", cfg.eval.micro_batch),
    ):
        _check(value > 0, f"config key '{key}' must be > 0, got {value}")
    _check(t.max_steps is None or t.max_steps > 0, f"config key 'train.max_steps' must be > 0, got {t.max_steps}")
    _check(
        t.save_every_steps is None or t.save_every_steps > 0,
        f"config key 'train.save_every_steps' must be > 0, got {t.save_every_steps}",
    )
    _check(
        cfg.eval.max_windows is None or cfg.eval.max_windows > 0,
        f"config key 'eval.max_windows' must be > 0, got {cfg.eval.max_windows}",
    )
    _check(
        t.reset_after_prune in ("none", "zero", "keep_v"),
        f"config key 'train.reset_after_prune' must be none, zero or keep_v, got {t.reset_after_prune!r}",
    )
    _check(
        bool(cfg.data.train),
        "config key 'data.train' needs at least one source (path: a .jsonl/.json/.parquet file, directory or hub dataset)",
    )
    for i, source in enumerate(cfg.data.train + cfg.calibration.sources):
        _check(
            source.format in ("text", "instruction"),
            f"data source {i} ({source.path}): format must be 'text' or 'instruction', got {source.format!r}",
        )
    _resolve_local_paths(cfg, base_dir)


def _check_lora(cfg: RunConfig) -> None:
    """LoraConfig fields; targets are PEFT module names (default: the seven roles' projections)."""
    r = cfg.lora.get("r", 8)
    _check(
        isinstance(r, int) and not isinstance(r, bool) and r > 0,
        f"config key 'lora.r' must be a positive int, got {r!r}",
    )
    targets = cfg.lora.get("target_modules")
    if targets is None or not (cfg.prune.enabled and cfg.prune.scorer == "foresight"):
        return
    names = {role: path.rsplit(".", 1)[-1] for role, path in LLAMA_LIKE_ROLES.items()}
    missing = [names[role] for role in ROLES if names[role] not in targets]
    _check(
        not missing,
        f"config key 'lora.target_modules' lacks {missing}: the foresight scorer needs LoRA on all seven projections",
    )


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith((".json", ".jsonl", ".parquet", ".gguf", ".yaml"))


def _resolve_local_paths(cfg: RunConfig, base_dir: Path) -> None:
    """Paths in the YAML are relative to the YAML's folder; a local-looking path must exist."""

    def resolve(key: str, value: str) -> str:
        if not _looks_local(value):
            return value
        path = (base_dir / Path(value).expanduser()).resolve()
        _check(path.exists(), f"config key '{key}': {value} does not exist (looked in {path})")
        return str(path)

    cfg.model.name_or_path = resolve("model.name_or_path", cfg.model.name_or_path)
    if cfg.model.tokenizer:
        cfg.model.tokenizer = resolve("model.tokenizer", cfg.model.tokenizer)
    if isinstance(cfg.deepspeed, str):
        cfg.deepspeed = resolve("deepspeed", cfg.deepspeed)
    for name, sources in (
        ("data.train", cfg.data.train),
        ("calibration.sources", cfg.calibration.sources),
        ("eval.perplexity", cfg.eval.perplexity),
    ):
        for i, source in enumerate(sources):
            resolved = resolve(f"{name}[{i}].path", source.path)
            if resolved != source.path:
                sources[i] = dataclasses.replace(source, path=resolved)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read, type-check and validate a run YAML; `overrides` are dotted keys (e.g. from the CLI)."""
    path = Path(path)
    _check(path.is_file(), f"config file {path} does not exist")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    cfg = _build(RunConfig, raw, "")
    validate(cfg, path.parent)
    return cfg
