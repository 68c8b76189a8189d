"""`exert-ds eval`: a model's labelled-task metrics, held-out perplexities and sparsity report in one JSON.

Runs in one process, or under a launcher with each rank taking a slice of the examples (scoring.py) and of
the perplexity windows (perplexity.py); with `--deepspeed` (a ZeRO stage-3 config) the model is partitioned
as it loads and runs as a DeepSpeed ZeRO-3 inference engine (no optimizer), so a model larger than one device
can be evaluated. Metrics are computed from the gathered per-example scores and equal the 1-process ones.
"""

from __future__ import annotations

import argparse
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
from exert_ds.data import DataSource
from exert_ds.errors import ConfigError
from exert_ds.evaluation.metrics import classification_report
from exert_ds.evaluation.tasks import LICENSEDCODE, TASKS, get_task, licensedcode_records, load_task

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


@dataclass
class EvalSettings:
    """What `exert-ds eval` was asked to do (the CLI's flags)."""

    model: str
    tasks: list[str]
    out: str
    data_dir: str | None = None
    task_data: dict[str, str] = field(default_factory=dict)
    perplexity: list[str] = field(default_factory=list)
    max_examples: int | None = None
    max_length: int = 1024
    micro_batch: int = 8
    window: int = 512
    max_windows: int | None = None
    deepspeed: str | None = None
    expect_sparsity: float | None = None
    sparsity_tolerance: float = 0.01
    dtype: str = "float32"
    tokenizer: str | None = None
    seed: int = 0
    bootstrap: int = 1000
    save_scores: bool = False


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


def check_settings(settings: EvalSettings) -> None:
    """Everything that can be checked before a process group or a model exists."""
    for name in settings.tasks:
        get_task(name)
    for name in settings.task_data:
        get_task(name)
    for spec in settings.perplexity:
        perplexity_set(spec)
    if not settings.tasks and not settings.perplexity:
        raise ConfigError("exert-ds eval: nothing to do; give --tasks and/or --perplexity")
    for key, value in (("--max-length", settings.max_length), ("--micro-batch", settings.micro_batch)):
        if value < 2 if key == "--max-length" else value < 1:
            raise ConfigError(f"{key} must be positive, got {value}")
    if settings.max_examples is not None and settings.max_examples < 1:
        raise ConfigError(f"--max-examples must be positive, got {settings.max_examples}")
    if settings.expect_sparsity is not None and not 0 <= settings.expect_sparsity < 1:
        raise ConfigError(f"--expect-sparsity must be in [0, 1), got {settings.expect_sparsity}")
    if not hasattr(torch, settings.dtype) or not isinstance(getattr(torch, settings.dtype), torch.dtype):
        raise ConfigError(f"--dtype {settings.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    model = Path(settings.model).expanduser()
    looks_local = settings.model.startswith((".", "/", "~")) or settings.model.endswith(".gguf")
    if (looks_local or settings.model.count("/") > 1) and not model.exists():
        raise ConfigError(f"--model {settings.model} does not exist")
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

    check_settings(settings)
    data_dir = resolve_data_dir(settings)
    # Data first: a missing file or bad field stops here, before the (long) model load.
    task_examples = [
        load_task(get_task(n), data_dir, settings.task_data.get(n), settings.max_examples, settings.seed)
        for n in settings.tasks
    ]
    runtime = open_model(
        ModelConfig(settings.model, dtype=settings.dtype, tokenizer=settings.tokenizer), settings.deepspeed
    )
    tokenizer, model = runtime.tokenizer, runtime.model
    results: dict[str, Any] = {
        "model": settings.model,
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


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """The `exert-ds eval` subcommand and its flags (cli.py calls this)."""
    p = sub.add_parser(
        "eval",
        help="labelled tasks, held-out perplexity and the sparsity report of a model, as one results JSON",
        description="Evaluate a model (HF directory, hub name, .gguf) on labelled tasks by label log-likelihood, "
        "held-out perplexity and its measured sparsity. Under a launcher each rank takes a slice; with --deepspeed "
        "(ZeRO stage 3) the model is partitioned across ranks.",
    )
    p.add_argument("--model", required=True, help="HF directory, hub name or .gguf file")
    p.add_argument("--tasks", default="", help=f"comma-separated tasks: {', '.join(TASKS)}")
    p.add_argument("--out", required=True, help="results JSON to write")
    p.add_argument("--data-dir", default=None, help=f"folder of the task data (default {DEFAULT_DATA_DIR} if present)")
    p.add_argument(
        "--task-data",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="read one task from this file, folder or hub name instead (repeatable)",
    )
    p.add_argument(
        "--perplexity",
        action="append",
        default=[],
        metavar="SET",
        help=f"held-out text: a preset ({', '.join(PERPLEXITY_SETS)}) or NAME=PATH[:FIELD] (repeatable)",
    )
    p.add_argument("--max-examples", type=int, default=None, help="per task, a seeded subset of this many examples")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per scored sequence (prompt cut from the left)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences (or windows) per forward")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity: the first N windows of each set")
    p.add_argument("--deepspeed", default=None, help="a ZeRO stage-3 DeepSpeed JSON: run as a ZeRO-3 inference engine")
    p.add_argument("--expect-sparsity", type=float, default=None, help="check every pruned matrix holds this sparsity")
    p.add_argument("--sparsity-tolerance", type=float, default=0.01, help="zeros allowed above the promise")
    p.add_argument("--dtype", default="float32", help="torch dtype to load the model in")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of --max-examples and the bootstrap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the 95%% interval")
    p.add_argument("--save-scores", action="store_true", help="also write per-example predictions and log-likelihoods")


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    task_data = {}
    for pair in args.task_data:
        name, sep, path = pair.partition("=")
        if not sep or not path:
            raise ConfigError(f"--task-data {pair!r}: expected TASK=PATH")
        task_data[name] = path
    return EvalSettings(
        model=args.model,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        out=args.out,
        data_dir=args.data_dir,
        task_data=task_data,
        perplexity=args.perplexity,
        max_examples=args.max_examples,
        max_length=args.max_length,
        micro_batch=args.micro_batch,
        window=args.window,
        max_windows=args.max_windows,
        deepspeed=args.deepspeed,
        expect_sparsity=args.expect_sparsity,
        sparsity_tolerance=args.sparsity_tolerance,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        seed=args.seed,
        bootstrap=args.bootstrap,
        save_scores=args.save_scores,
    )


def eval_command(args: argparse.Namespace) -> int:
    """Run `exert-ds eval`; exit status 1 (after writing the results) when the sparsity promise is broken."""
    results = run_eval(settings_from_args(args))
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
