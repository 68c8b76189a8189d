"""`exert-ds eval`: a model's labelled-task metrics, held-out perplexities and sparsity report in one JSON.

Runs in one process, or under a launcher with each rank taking a slice of the examples (scoring.py) and of
the perplexity windows (perplexity.py); with `--deepspeed` (a ZeRO stage-3 config) the model is partitioned
as it loads and runs as a DeepSpeed ZeRO-3 inference engine (no optimizer), so a model larger than one device
can be evaluated. Metrics are computed from the gathered per-example scores and equal the 1-process ones.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exert_ds.config import ModelConfig
from exert_ds.data import DataSource, check_source_files
from exert_ds.errors import ConfigError
from exert_ds.evaluation.metrics import classification_report
from exert_ds.evaluation.tasks import LICENSEDCODE, TASKS, get_task, licensedcode_records, load_task
from exert_ds.storage.manifest import is_expert_dir, read_expert_manifest

DEFAULT_DATA_DIR = "../shared/data"


@dataclass(frozen=True)
class PerplexitySet:
    """Held-out text for perplexity: `path` is under the data dir unless absolute; rows filtered by `filter`."""

    name: str
    domain: str
    path: str
    field: str = "text"
    filter: dict[str, str] | None = None


PERPLEXITY_SETS: dict[str, PerplexitySet] = {
    s.name: s
    for s in (
        PerplexitySet("medquad_answers", "health", "health/medquad.jsonl", "answer", {"split": "test"}),
        PerplexitySet("cuad_clauses", "legal", "legal/cuad.jsonl", "text", {"split": "test"}),
        PerplexitySet("licence_texts", "legal", LICENSEDCODE, "text"),
    )
}


def _flag(help_text: str, **argparse_kwargs: Any) -> dict[str, Any]:
    """A field's `metadata`: HfArgumentParser passes it to `add_argument` (help, metavar, action)."""
    return {"help": help_text, **argparse_kwargs}


@dataclass
class EvalSettings:
    """What `exert-ds eval` was asked to do. Each field is one flag (`--max-examples` for `max_examples`), made by
    transformers' HfArgumentParser from the field's type, default and metadata (`exert-ds eval --help`)."""

    model: str = field(metadata=_flag("HF directory, hub name, .gguf file or sparse expert directory"))
    out: str = field(metadata=_flag("results JSON to write"))
    tasks: list[str] = field(
        default_factory=list, metadata=_flag(f"comma-separated tasks: {', '.join(TASKS)}", metavar="TASKS")
    )
    data_dir: str | None = field(
        default=None, metadata=_flag(f"folder of the task data (none: {DEFAULT_DATA_DIR} if it exists)")
    )
    task_data: list[str] = field(
        default_factory=list,
        metadata=_flag(
            "read one task from this file, folder or hub name instead (repeatable)",
            metavar="TASK=PATH",
            action="extend",
        ),
    )
    perplexity: list[str] = field(
        default_factory=list,
        metadata=_flag(
            f"held-out text: a preset ({', '.join(PERPLEXITY_SETS)}) or NAME=PATH[:FIELD] (repeatable)",
            metavar="SET",
            action="extend",
        ),
    )
    max_examples: int | None = field(default=None, metadata=_flag("per task, a seeded subset of this many examples"))
    max_length: int = field(default=1024, metadata=_flag("tokens per scored sequence (prompt cut from the left)"))
    micro_batch: int = field(default=8, metadata=_flag("sequences (or windows) per forward"))
    window: int = field(default=512, metadata=_flag("perplexity window in tokens"))
    max_windows: int | None = field(default=None, metadata=_flag("perplexity: the first N windows of each set"))
    deepspeed: str | None = field(
        default=None, metadata=_flag("a ZeRO stage-3 DeepSpeed JSON: run as a ZeRO-3 inference engine")
    )
    adapter: str | None = field(
        default=None,
        metadata=_flag(
            "a PEFT LoRA adapter directory merged into the model before evaluation (e.g. train.save_event_adapters' "
            "event_adapters/event-K on event K-1's expert: the model event K started from); the merge is dense, so no "
            "sparsity promise is checked; not with --deepspeed",
            metavar="DIR",
        ),
    )
    expect_sparsity: float | None = field(default=None, metadata=_flag("check every pruned matrix holds this sparsity"))
    sparsity_tolerance: float = field(default=0.01, metadata=_flag("zeros allowed above the promise"))
    dtype: str = field(default="float32", metadata=_flag("torch dtype to load the model in"))
    tokenizer: str | None = field(default=None, metadata=_flag("tokenizer (none: the model's own)"))
    seed: int = field(default=0, metadata=_flag("seed of --max-examples and the bootstrap"))
    bootstrap: int = field(default=1000, metadata=_flag("bootstrap resamples of the 95%% interval"))
    save_scores: bool = field(default=False, metadata=_flag("also write per-example predictions and log-likelihoods"))
    task_file: str | None = field(
        default=None,
        metadata=_flag(
            "labelled tasks defined in a YAML file (evaluation/task_file.py); --tasks defaults to all of them"
        ),
    )
    sparse_kernels: str | None = field(
        default=None,
        metadata=_flag(
            "2:4: tasks and perplexity on torch's 2:4 semi-structured sparse kernels (CUDA, one process)",
            choices=["2:4"],
        ),
    )
    lm_eval_tasks: list[str] = field(
        default_factory=list,
        metadata=_flag("comma-separated lm-evaluation-harness tasks, run on the same model", metavar="TASKS"),
    )
    lm_eval_include: str | None = field(default=None, metadata=_flag("folder of lm-eval task YAMLs", metavar="DIR"))

    def __post_init__(self) -> None:
        # `--tasks a,b` (as it always was) and `--tasks a b` both give [a, b]
        self.tasks = [name.strip() for item in self.tasks for name in item.split(",") if name.strip()]
        self.lm_eval_tasks = [name.strip() for item in self.lm_eval_tasks for name in item.split(",") if name.strip()]

    def task_paths(self) -> dict[str, str]:
        """`--task-data TASK=PATH` pairs as task → path."""
        out = {}
        for pair in self.task_data:
            name, sep, path = pair.partition("=")
            if not sep or not path:
                raise ConfigError(f"--task-data {pair!r}: expected TASK=PATH")
            out[name] = path
        return out


def perplexity_set(spec: str) -> PerplexitySet:
    """A preset name, or NAME=PATH[:FIELD] (field defaults to 'text'; the domain recorded is NAME)."""
    if "=" not in spec:
        if spec not in PERPLEXITY_SETS:
            raise ConfigError(
                f"--perplexity {spec!r}: not a preset ({', '.join(PERPLEXITY_SETS)}); or give NAME=PATH[:FIELD]"
            )
        return PERPLEXITY_SETS[spec]
    name, path = spec.split("=", 1)
    text_field = "text"
    head, sep, tail = path.rpartition(":")
    if sep and tail and "/" not in tail and "." not in tail:
        path, text_field = head, tail
    if not name or not path:
        raise ConfigError(f"--perplexity {spec!r}: expected NAME=PATH[:FIELD]")
    return PerplexitySet(name, name, path, text_field)


def resolve_data_dir(settings: EvalSettings) -> str | None:
    """--data-dir, else ../shared/data when it exists (a convenience for this project's layout), else None."""
    if settings.data_dir is not None:
        if not Path(settings.data_dir).is_dir():
            raise ConfigError(f"--data-dir {settings.data_dir} is not a directory")
        return settings.data_dir
    return DEFAULT_DATA_DIR if Path(DEFAULT_DATA_DIR).is_dir() else None


def perplexity_source(spec: PerplexitySet, data_dir: str | None, scratch: Path) -> DataSource:
    if spec.path == LICENSEDCODE:
        rows = [r for r in licensedcode_records() if r["split"] == "test"]
        path = scratch / "licence_texts.jsonl"
        path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
        return DataSource(str(path))
    path = Path(spec.path)
    if not path.is_absolute() and spec.name in PERPLEXITY_SETS:
        if data_dir is None:
            raise ConfigError(f"--perplexity {spec.name} reads {spec.path}: give --data-dir")
        path = Path(data_dir) / path
    if not path.exists():
        raise ConfigError(f"--perplexity {spec.name}: {path} does not exist")
    return DataSource(str(path), text_field=spec.field, filter=spec.filter)


def check_lm_eval_request(settings: EvalSettings) -> None:
    """--lm-eval-tasks: lm-eval installed, and one process (its HFLM takes a whole model)."""
    import importlib.util

    from exert_ds.runtime.dist import launched_world_size

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--lm-eval-tasks needs lm-evaluation-harness: pip install 'exert_ds[lm-eval]'")
    if settings.deepspeed or launched_world_size() > 1:
        raise ConfigError("--lm-eval-tasks runs in one process: start exert-ds eval without a launcher or --deepspeed")


def check_settings(settings: EvalSettings) -> None:
    """Everything that can be checked before a process group or a model exists."""
    for name in settings.tasks:
        get_task(name)
    for name in settings.task_paths():
        get_task(name)
    for spec in settings.perplexity:
        perplexity_set(spec)
    if settings.lm_eval_tasks:
        check_lm_eval_request(settings)
    if not settings.tasks and not settings.perplexity and not settings.lm_eval_tasks:
        raise ConfigError("exert-ds eval: nothing to do; give --tasks, --perplexity and/or --lm-eval-tasks")
    for key, value in (("--max-length", settings.max_length), ("--micro-batch", settings.micro_batch)):
        if value < 2 if key == "--max-length" else value < 1:
            raise ConfigError(f"{key} must be positive, got {value}")
    if settings.max_examples is not None and settings.max_examples < 1:
        raise ConfigError(f"--max-examples must be positive, got {settings.max_examples}")
    if settings.adapter is not None:
        if settings.deepspeed:
            raise ConfigError("--adapter is merged into whole weights in each process: drop --deepspeed")
        if settings.expect_sparsity is not None or settings.sparse_kernels:
            raise ConfigError("--adapter makes the weights dense: drop --expect-sparsity and --sparse-kernels")
        if not Path(settings.adapter).exists():
            raise ConfigError(f"--adapter {settings.adapter} does not exist")
        if not (Path(settings.adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"--adapter {settings.adapter}: not a PEFT adapter directory (no adapter_config.json)")
    if settings.expect_sparsity is not None and not 0 <= settings.expect_sparsity < 1:
        raise ConfigError(f"--expect-sparsity must be in [0, 1), got {settings.expect_sparsity}")
    if not hasattr(torch, settings.dtype) or not isinstance(getattr(torch, settings.dtype), torch.dtype):
        raise ConfigError(f"--dtype {settings.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    model = Path(settings.model).expanduser()
    looks_local = settings.model.startswith((".", "/", "~")) or settings.model.endswith(".gguf")
    if (looks_local or settings.model.count("/") > 1) and not model.exists():
        raise ConfigError(f"--model {settings.model} does not exist")
    if settings.expect_sparsity is not None and is_expert_dir(model):
        if read_expert_manifest(model)["promise"].get("blocks"):
            raise ConfigError(
                f"--expect-sparsity: {settings.model} promises one sparsity per block (OWL allocation), which its "
                "manifest's promise checks: drop --expect-sparsity"
            )
    if not Path(settings.out).parent.exists() and str(Path(settings.out).parent):
        raise ConfigError(f"--out {settings.out}: folder {Path(settings.out).parent} does not exist")


def versions() -> dict[str, str]:
    import deepspeed
    import transformers

    import exert_ds

    return {
        "exert_ds": getattr(exert_ds, "__version__", "unknown"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
    }


def task_result(examples, loglik: np.ndarray, settings: EvalSettings) -> dict[str, Any]:
    pred = [examples.labels[i] for i in loglik.argmax(1)]
    result = {
        "domain": examples.task.domain,
        "source": examples.source,
        "labels": examples.labels,
        "verbalisations": examples.verbalisations,
        **classification_report(examples.gold, pred, settings.bootstrap, settings.seed),
    }
    if settings.save_scores:
        result["gold"] = list(examples.gold)
        result["predictions"] = pred
        result["loglik"] = loglik.tolist()
    return result


def run_eval(settings: EvalSettings) -> dict[str, Any]:
    """The whole evaluation; returns the results dict on every rank and writes it (rank 0) to settings.out."""
    from exert_ds.errors import user_errors
    from exert_ds.evaluation.model_runtime import (
        open_model,  # deepspeed/transformers only once the flags are known good
    )
    from exert_ds.evaluation.perplexity import perplexity, text_windows
    from exert_ds.evaluation.scoring import build_sequences, label_loglikelihoods
    from exert_ds.evaluation.sparsity import check_promise, sparsity_report
    from exert_ds.storage.atomic import SharedWrite, write_errors

    if settings.task_file:  # its tasks join the registry; with no --tasks, all of them run
        from exert_ds.evaluation.task_file import register_task_file

        names = register_task_file(settings.task_file)
        settings.tasks = settings.tasks or names
    if settings.sparse_kernels:  # before the model loads: CUDA, one process
        from exert_ds.evaluation.sparse_kernels import check_request

        check_request(settings.sparse_kernels, settings.deepspeed)
    check_settings(settings)
    data_dir = resolve_data_dir(settings)
    # Data first: a missing file or bad field stops here, before the (long) model load.
    task_examples = [
        load_task(get_task(n), data_dir, settings.task_paths().get(n), settings.max_examples, settings.seed)
        for n in settings.tasks
    ]
    for spec in map(perplexity_set, settings.perplexity):  # the perplexity sets' files too (licence texts: later)
        if spec.path != LICENSEDCODE:
            with user_errors(f"--perplexity {spec.name}"):
                check_source_files(perplexity_source(spec, data_dir, scratch=Path()))
    runtime = open_model(
        ModelConfig(settings.model, dtype=settings.dtype, tokenizer=settings.tokenizer),
        settings.deepspeed,
        settings.adapter,
    )
    tokenizer, model = runtime.tokenizer, runtime.model
    results: dict[str, Any] = {
        "model": settings.model,
        "adapter": settings.adapter,
        "model_kind": runtime.kind,
        "dtype": settings.dtype,
        "world_size": runtime.world,
        "zero3": runtime.zero3,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "settings": {
            k: getattr(settings, k)
            for k in ("max_examples", "max_length", "micro_batch", "window", "max_windows", "seed", "bootstrap")
        },
        "tasks": {},
        "perplexity": {},
    }
    kernels = contextlib.ExitStack()  # --sparse-kernels: tasks and perplexity run on 2:4 sparse weights
    if settings.sparse_kernels:
        from exert_ds.evaluation.sparse_kernels import semi_structured_weights

        swapped = kernels.enter_context(semi_structured_weights(model))
        results["sparse_kernels"] = {"pattern": settings.sparse_kernels, "matrices": swapped}
    for examples in task_examples:
        with user_errors(f"task {examples.task.name}"):
            sequences = build_sequences(tokenizer, examples.prompts, examples.verbalisations, settings.max_length)
        loglik = label_loglikelihoods(
            model, sequences, settings.micro_batch, tokenizer.pad_token_id, runtime.rank, runtime.world, runtime.gather
        )
        results["tasks"][examples.task.name] = task_result(examples, loglik, settings)
        runtime.log(f"{examples.task.name}: accuracy {results['tasks'][examples.task.name]['accuracy']:.4f}")
    with tempfile.TemporaryDirectory() as scratch:
        for spec in map(perplexity_set, settings.perplexity):
            with user_errors(f"--perplexity {spec.name}"):
                source = perplexity_source(spec, data_dir, Path(scratch))
                windows = text_windows([source], tokenizer, settings.window, settings.max_windows)
            ppl = perplexity(model, windows, settings.micro_batch, runtime.rank, runtime.world, runtime.reduce)
            results["perplexity"][spec.name] = {"domain": spec.domain, "window": settings.window, **ppl}
            runtime.log(f"perplexity {spec.name}: {ppl['perplexity']:.4f}")
    if settings.lm_eval_tasks:  # lm-evaluation-harness on the same model (evaluation/lm_eval_model.py)
        from exert_ds.evaluation.lm_eval_model import lm_eval_results

        results["lm_eval"] = lm_eval_results(
            model,
            tokenizer,
            settings.lm_eval_tasks,
            settings.lm_eval_include,
            settings.micro_batch,
            settings.max_length,
        )
    kernels.close()
    report = sparsity_report(model, runtime.reduce)
    promised = settings.expect_sparsity if settings.expect_sparsity is not None else runtime.promised_sparsity
    if promised is not None:
        report["check"] = check_promise(report, promised, settings.sparsity_tolerance)
    results["sparsity"] = report
    shared = SharedWrite()  # a refused write stops every rank with the same line
    if runtime.rank == 0:
        with shared.catch(), write_errors(settings.out):
            Path(settings.out).write_text(json.dumps(results, indent=1))
    shared.share()
    runtime.log(f"wrote {settings.out}")
    runtime.close()
    return results


def parse_settings(argv: list[str]) -> EvalSettings:
    """`exert-ds eval`'s flags → EvalSettings, by transformers' HfArgumentParser (bad flags: argparse's usage
    line and exit status 2, as for every subcommand)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        EvalSettings,
        prog="exert-ds eval",
        description="Evaluate a model (HF directory, hub name, .gguf, sparse expert) on labelled tasks by label "
        "log-likelihood, held-out perplexity and its measured sparsity. Under a launcher each rank takes a slice; "
        "with --deepspeed (ZeRO stage 3) the model is partitioned across ranks.",
    )
    (settings,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    return settings


def eval_command(argv: list[str], verbose: bool = False) -> int:
    """Run `exert-ds eval` with its flags `argv`; exit status 1 (after writing the results) when the sparsity
    promise is broken. `verbose`: DeepSpeed's INFO lines too."""
    from exert_ds.runtime.dist import launched_rank, set_verbosity

    settings = parse_settings(argv)
    set_verbosity(verbose, launched_rank())
    results = run_eval(settings)
    check = results["sparsity"].get("check")
    if check and not check["passed"]:
        shown = "; ".join(check["failures"][:5])
        print(
            f"exert-ds: sparsity check failed: {len(check['failures'])} matrices differ from the promised "
            f"{check['promised']} ({shown})",
            file=sys.stderr,
        )
        return 1
    return 0
