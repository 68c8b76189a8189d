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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from exert_ds.errors import ConfigError
from exert_ds.prune.pattern import pattern_problem
from exert_ds.roles import LLAMA_LIKE_ROLES, ROLES
from exert_ds.validation import check_lora, check_model, check_output_dir

EmaDtype = Literal["float32", "bfloat16"]  # prune.ema_dtype
DEFAULT_EMA_DTYPE: EmaDtype = "float32"  # the one place to flip to bfloat16 once its quality is measured (issue 18.1)
# train.* keys a resume may change
BOOKKEEPING_KEYS = ("log_every", "save_every_steps", "keep_checkpoints", "save_event_adapters", "save_event_experts")


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


@dataclass(frozen=True)
class Bounds:
    """A numeric key's range, declared in its type: `Annotated[int, Bounds(gt=0)]`. `_convert` checks it."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if self.ge is not None else '>'} {low[1:]}"
        return f"{'<=' if self.le is not None else '<'} {high[:-1]}"


@dataclass(frozen=True)
class OneOf:
    """A string key whose choices live in a registry, read when the key is checked:
    `Annotated[str, OneOf(scorer_registry)]` accepts every name registered by then. `registry` is a function that
    returns the mapping, so that this module imports no registry (and no torch) until a config is checked."""

    registry: Callable[[], Mapping[str, Any]]


def scorer_registry() -> Mapping[str, Any]:
    """prune/scorers.py's SCORERS (name → Scorer class), imported when first needed."""
    from exert_ds.prune.scorers import SCORERS

    return SCORERS


def _num(value: float) -> str:
    return f"{value:g}"


Positive = Annotated[int, Bounds(gt=0)]
Dtype = Literal["float32", "bfloat16", "float16"]
PbsMode = Literal["hessian", "reference", "off"]
ScorerName = Annotated[str, OneOf(scorer_registry)]  # every registered scorer (prune/scorers.py)
MatmulPrecision = Literal["highest", "high"]  # torch.set_float32_matmul_precision's names: float32, TF32 on CUDA
ResetPolicy = Literal["none", "zero", "keep_v"]  # `train.reset_after_prune` (algorithm.md §5)
AdapterDtype = Literal["float32", "model"]  # `train.adapter_dtype`
DataFormat = Literal["text", "instruction"]  # a data source's `format`
DATA_FORMATS: tuple[str, ...] = typing.get_args(DataFormat)


@dataclass(frozen=True)
class DataSource:
    """One entry of `data.train` / `calibration.sources` in the run YAML.

    Templates are format strings over the record's fields; `{prompt}` and `{response}` read `prompt_field`
    and `response_field`. `split` picks a hub split; local files load whole, select rows with `filter`.
    """

    path: str
    format: str = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    prompt_template: str = "{prompt}\n"
    response_template: str = "{response}"
    split: str = "train"
    filter: dict[str, str] | None = None
    max_records: int | None = None


@dataclass
class ModelConfig:
    name_or_path: str = ""  # hub name, local HF directory, or a .gguf file
    gguf_file: str | None = None  # with a directory: the GGUF file inside it
    tokenizer: str | None = None  # defaults to the model's own
    dtype: Dtype = "bfloat16"
    attn_implementation: str | None = None  # sdpa, eager, flash_attention_2 (HF names)
    revision: str | None = None
    trust_remote_code: bool = False
    init: Literal["pretrained", "random"] = (
        "pretrained"  # "random": build from the config.json alone (scale tests with random weights)
    )


@dataclass
class DataConfig:
    train: list[DataSource] = field(default_factory=list)
    seq_len: Positive = 512
    packing: bool = True


@dataclass
class CalibrationConfig:
    sources: list[DataSource] = field(default_factory=list)  # empty: the training sources
    num_samples: Positive = 128
    seq_len: Positive = 2048
    micro_batch: Positive = 4


@dataclass
class PruneConfig:
    enabled: bool = True
    scorer: ScorerName = "foresight"
    sparsity: float = 0.5  # with n and m: the pattern rule of prune/pattern.py
    n: int = 0  # N:M pattern (0:0 = unstructured)
    m: int = 0
    every_steps: Positive | None = None  # None: the epoch schedule of algorithm.md §6
    start_step: Annotated[int, Bounds(ge=0)] = 0
    ramp: Literal["none", "cubic"] = "none"  # "cubic": Zhu & Gupta ramp from 0 to sparsity over the events
    ema_eta: Annotated[float, Bounds(gt=0, le=1)] = 0.5
    reconstruct: Literal["none", "obs"] = "none"  # "obs": OBS update of the kept weights at each event (§8 a)
    ema_dtype: EmaDtype = DEFAULT_EMA_DTYPE  # the EMA score state between events, as held and as checkpointed
    ema_shadow: bool = False  # diagnostic (issue 18): also hold a float32 EMA (never checkpointed) and report, per
    # event, the share of held mask entries that a mask chosen from it would set otherwise (ema_shadow_differs/ROLE)
    # K optimizer steps after the final event with the adapter's product masked to the kept entries (§8 c,
    # prune/recovery.py), then a merge that keeps exactly the final mask; 0: none. Each adapted linear forms its dense
    # out × in product for these steps: with a large model, set train.gradient_checkpointing
    recovery_steps: Annotated[int, Bounds(ge=0)] = 0
    # how the sparsity is spread over decoder blocks (§8 d, prune/allocation.py): "uniform" (the paper's), or "owl"
    # (outlier-weighted: block sparsities 2·owl_lambda apart from least to most pruned, mean p; outliers are metrics
    # above owl_threshold × the block's mean), measured once at the first event
    allocation: Literal["uniform", "owl"] = "uniform"
    owl_lambda: Annotated[float, Bounds(gt=0, lt=1)] = 0.08
    owl_threshold: Annotated[float, Bounds(gt=0)] = 5.0


@dataclass
class PBSConfig:
    mode: PbsMode = "hessian"
    reg: Annotated[float, Bounds(ge=0)] | None = None  # default per mode: 1e-2 (hessian, relative), 1e-8 (reference)
    keep_weight: Annotated[float, Bounds(ge=0, le=1)] = 1.0
    matmul_precision: MatmulPrecision = (
        "highest"  # hessian mode's float32 products: highest (float32) | high (TF32 on CUDA)
    )
    at_final: bool = False  # PBS at the final event as well (algorithm.md §8 b)


@dataclass
class TrainConfig:
    epochs: Positive = 2
    max_steps: Positive | None = None  # cap on the optimizer steps before the final event (None: epochs × steps per
    # epoch); prune.recovery_steps come after it
    seed: int = 0
    output_dir: str = "runs/exert"
    log_every: Positive = 10
    gradient_checkpointing: bool = False
    reset_after_prune: ResetPolicy = "none"  # Adam moments after an event (algorithm.md §5)
    save_every_steps: Positive | None = None  # checkpoints also after every prune event and at the end
    keep_checkpoints: Positive = 2
    save_event_adapters: bool = False  # each event's adapter before its merge: output_dir/event_adapters/event-K
    # the merged sparse model right after each event, as a sparse expert: output_dir/event_experts/event-K (the whole
    # model's bytes at the event's sparsity, once per event). With save_event_adapters, event K−1's expert plus
    # event_adapters/event-K (`exert-ds eval --adapter`) is the model event K started from
    save_event_experts: bool = False
    # LoRA's parameters: float32 (PEFT's autocast of bf16/fp16 adapters), or the model's dtype, with DeepSpeed's bf16
    # optimizer keeping the float32 master copy (no float32 copy of every projection's input kept for backward)
    adapter_dtype: AdapterDtype = "model"


@dataclass
class EvalConfig:
    perplexity: list[DataSource] = field(default_factory=list)  # held-out text; empty: no perplexity
    window: Positive = 256
    max_windows: Positive | None = 32
    micro_batch: Positive = 4


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
        if fields["prune"]["ema_dtype"] == "float32":  # as checkpoints of format 3 held it: they still resume
            fields["prune"].pop("ema_dtype")
        if not fields["prune"]["recovery_steps"]:  # the key's default: checkpoints written before it still resume
            fields["prune"].pop("recovery_steps")
        if fields["prune"]["allocation"] == "uniform":  # likewise; the OWL keys mean nothing then
            for key in ("allocation", "owl_lambda", "owl_threshold"):
                fields["prune"].pop(key)
        blob = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and value types recursively."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{where or 'top level'}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
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


def build_dataclass(cls: type, raw: Any, where: str) -> Any:
    """Dataclass `cls` from the mapping `raw`, its keys and value types checked as for a run YAML section
    (`where`: the key path in messages); also used for `exert-ds eval --task-file` (evaluation/task_file.py)."""
    return _build(cls, raw, where)


def _choices(options: tuple) -> str:
    names = [repr(o) for o in options]
    return " or ".join(names) if len(names) == 2 else f"one of {', '.join(names)}"


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *constraints = typing.get_args(tp)
        value = _convert(base, value, path)
        for rule in constraints:
            if isinstance(rule, Bounds) and not rule.holds(value):
                raise ConfigError(f"config key '{path}' must be {rule.describe()}, got {value}")
            if isinstance(rule, OneOf) and value not in rule.registry():
                raise ConfigError(f"config key '{path}' must be {_choices(tuple(rule.registry()))}, got {value!r}")
        return value
    if origin is Literal:
        options = typing.get_args(tp)
        if value not in options or isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be {_choices(options)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, path)
            except ConfigError as err:
                errors.append(err)
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


def check_typed(section: Any, where: str) -> None:
    """Check a section built in code (not read from YAML) against its declared types, choices and bounds: the
    same checks and messages as a YAML value gets."""
    hints = typing.get_type_hints(type(section), include_extras=True)
    for f in dataclasses.fields(section):
        value, path = getattr(section, f.name), f"{where}.{f.name}"
        if dataclasses.is_dataclass(value):
            check_typed(value, path)
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, item in enumerate(value):
                check_typed(item, f"{path}[{i}]")
        else:
            _convert(hints[f.name], value, path)


def _check_pruning(cfg: RunConfig) -> None:
    """The rules that tie keys together: the sparsity pattern, and what the chosen scorer allows."""
    p = cfg.prune
    _check(not pattern_problem(p.sparsity, p.n, p.m), pattern_problem(p.sparsity, p.n, p.m))
    _check(
        not (scorer_registry()[p.scorer].updates_weights and cfg.pbs.mode != "off"),
        f"prune.scorer '{p.scorer}' updates the weights itself: set 'pbs.mode: off'",
    )
    _check(
        not (scorer_registry()[p.scorer].updates_weights and p.reconstruct != "none"),
        f"prune.scorer '{p.scorer}' updates the weights itself: set 'prune.reconstruct: none'",
    )
    _check(
        not (p.reconstruct == "obs" and cfg.pbs.mode == "reference"),
        "config key 'prune.reconstruct: obs' updates the kept weights, which 'pbs.mode: reference' does not model: "
        "use pbs.mode hessian or off",
    )
    _check(
        not (p.ema_shadow and (p.ema_dtype != "bfloat16" or scorer_registry()[p.scorer].updates_weights)),
        "config key 'prune.ema_shadow' compares a bfloat16 EMA with a float32 one: set 'prune.ema_dtype: bfloat16' "
        "and a scorer that keeps an EMA (not one that updates the weights), or drop ema_shadow",
    )
    _check(
        not (p.recovery_steps and not p.enabled),
        "config key 'prune.recovery_steps' recovers after the final mask, but 'prune.enabled' is false: set "
        "prune.recovery_steps: 0 or enable pruning",
    )
    _check(
        not (p.recovery_steps and (cfg.lora.get("use_dora") or cfg.lora.get("lora_bias"))),
        "config key 'prune.recovery_steps' masks plain LoRA's product B·A only: drop lora.use_dora / lora.lora_bias, "
        "or set prune.recovery_steps: 0",
    )
    _check(
        not (p.allocation == "owl" and (p.n or p.m)),
        "config key 'prune.allocation: owl' varies the sparsity over blocks, which an N:M pattern fixes: drop "
        "prune.n/prune.m or use allocation: uniform",
    )
    _check(
        not (p.allocation == "owl" and not p.enabled),
        "config key 'prune.allocation: owl' spreads the pruning over blocks, but 'prune.enabled' is false: set "
        "allocation: uniform or enable pruning",
    )
    _check(
        not (p.allocation == "owl" and not (2 * p.owl_lambda <= p.sparsity and p.sparsity + 2 * p.owl_lambda < 1)),
        f"config key 'prune.owl_lambda' ({p.owl_lambda}) must keep every block's sparsity in [0, 1) around "
        f"prune.sparsity {p.sparsity}: need 2·owl_lambda <= sparsity and sparsity + 2·owl_lambda < 1",
    )
    _check(
        not (cfg.train.save_event_experts and not p.enabled),
        "config key 'train.save_event_experts' keeps the model after each prune event, but 'prune.enabled' is false: "
        "there are no events; drop save_event_experts or enable pruning",
    )
    _check(
        not (cfg.pbs.at_final and cfg.pbs.mode == "off"),
        "config key 'pbs.at_final' asks for PBS at the final event but 'pbs.mode' is off: set a mode or drop at_final",
    )


def check_event_sections(cfg: RunConfig) -> None:
    """What a prune event reads (prune, pbs, calibration, train), checked as `validate` checks it: for configs
    built in code (tests, benchmarks) as much as for YAML."""
    for name in ("prune", "pbs", "calibration", "train"):
        check_typed(getattr(cfg, name), name)
    _check_pruning(cfg)


def validate(cfg: RunConfig, base_dir: Path) -> None:
    """What the types cannot say (their choices and bounds are checked as the YAML is read): required keys, the
    rules that tie keys together, and files. DeepSpeed's own JSON is checked by `ds_config.load_ds_config`."""
    _check(
        bool(cfg.model.name_or_path), "config key 'model.name_or_path' is required (hub name, HF directory or .gguf)"
    )
    _check_pruning(cfg)
    check_lora(cfg.lora)  # PEFT's own schema first, then what the run needs of it
    _check_lora(cfg)
    _check(
        bool(cfg.data.train),
        "config key 'data.train' needs at least one source (path: a .jsonl/.json/.parquet file, directory or hub dataset)",
    )
    for i, source in enumerate(cfg.data.train + cfg.calibration.sources):
        _check(
            source.format in DATA_FORMATS,
            f"data source {i} ({source.path}): format must be 'text' or 'instruction', got {source.format!r}",
        )
    _resolve_local_paths(cfg, base_dir)
    check_model(cfg.model.attn_implementation)
    check_output_dir("train.output_dir", cfg.train.output_dir)


def _check_lora(cfg: RunConfig) -> None:
    """LoraConfig fields; targets are PEFT module names (default: the seven roles' projections)."""
    r = cfg.lora.get("r", 8)
    _check(
        isinstance(r, int) and not isinstance(r, bool) and r > 0,
        f"config key 'lora.r' must be a positive int, got {r!r}",
    )
    targets = cfg.lora.get("target_modules")
    if targets is None or not (cfg.prune.enabled and scorer_registry()[cfg.prune.scorer].needs_all_roles):
        return
    names = {role: path.rsplit(".", 1)[-1] for role, path in LLAMA_LIKE_ROLES.items()}
    missing = [names[role] for role in ROLES if names[role] not in targets]
    _check(
        not missing,
        f"config key 'lora.target_modules' lacks {missing}: the {cfg.prune.scorer} scorer needs LoRA on all seven "
        "projections",
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
