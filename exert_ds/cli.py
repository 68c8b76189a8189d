"""`exert-ds` command line: one subcommand per job; train and prune read a run YAML (see README).

Only argparse and the standard library are imported here: each command imports its own module when it runs, so
`exert-ds --help` and `exert-ds inspect` answer without loading torch, deepspeed, peft, datasets or transformers
(README, "CLI speed"; tests/test_imports.py holds it). Before any library is imported, every rank but 0 is told
to print no progress bars and no warnings (runtime/dist.py `quiet_other_ranks`).
"""

from __future__ import annotations

import argparse
import sys

from exert_ds.analysis.command import add_analyze_parser
from exert_ds.errors import ConfigError

DESCRIPTION = (
    "EfficientXpert (ForeSight Mask + Partial Brain Surgeon) inside DeepSpeed ZeRO-3. Start the distributed "
    "commands with a launcher: deepspeed, torchrun, mpirun or srun (see launch/)."
)
TRAIN_HELP = (
    "LoRA fine-tuning under ZeRO-3 with the EfficientXpert prune schedule (and prune.recovery_steps masked LoRA steps "
    "after the final event); writes the sparse expert"
)
PRUNE_HELP = (
    "one-shot prune event (foresight, wanda, magnitude, sparsegpt) on a dense model; with prune.recovery_steps K, "
    "then K LoRA steps on data.train masked to the kept weights"
)
EVAL_HELP = "labelled tasks, held-out perplexity and the sparsity report of a model, as one results JSON"
EXPORT_HELP = (
    "stream a sparse expert into a Hugging Face directory (safetensors shards + index, config, tokenizer) that "
    "AutoModelForCausalLM.from_pretrained loads; checks every file's sha256 and every pruned row's zeros. One "
    "process, no launcher; host memory about twice the largest tensor"
)
INSPECT_HELP = (
    "print what a training checkpoint or a sparse expert holds: step, prune events done, measured sparsity per "
    "role (from the stored bitmasks), world size, files with sizes, and the sha256 check of every file; exit "
    "status 1 if any file is missing, truncated or altered"
)
VERBOSE_HELP = "also print DeepSpeed's INFO lines (default: its warnings and errors, on rank 0 only)"


def _overrides(pairs: list[str]) -> dict:
    """`--set prune.sparsity=0.4` pairs → {"prune.sparsity": 0.4} (values parsed as YAML scalars)."""
    from exert_ds.config import parse_yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set prune.sparsity=0.4")
        out[key] = parse_yaml(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exert-ds", description=DESCRIPTION)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, **kwargs)
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        return p

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        p = command(name, help_text)
        p.add_argument(
            "--config", required=True, help="run YAML (model, lora, deepspeed, data, calibration, prune, pbs, train)"
        )
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set prune.sparsity=0.4 (repeatable)",
        )
        return p

    train = with_config("train", TRAIN_HELP)
    train.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="continue from a checkpoint: 'auto' = output_dir/checkpoints/latest if there is one, or a checkpoint dir",
    )
    prune = with_config("prune", PRUNE_HELP)
    prune.add_argument("--adapter", default=None, help="a trained PEFT adapter directory to merge before pruning")
    # eval's flags are its settings dataclass (evaluation/evaluate.py, read by HfArgumentParser), parsed when it runs
    command("eval", EVAL_HELP, add_help=False, allow_abbrev=False)
    export = command("export", EXPORT_HELP)
    export.add_argument(
        "--ckpt",
        required=True,
        metavar="DIR",
        help="the expert directory a run writes (output_dir/expert), or the run's output_dir",
    )
    export.add_argument("--out", required=True, metavar="HF_DIR", help="the Hugging Face directory to write")
    export.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB); one model.safetensors when it fits",
    )
    export.add_argument("--overwrite", action="store_true", help="replace HF_DIR if it exists and is not empty")
    export.add_argument(
        "--format",
        choices=("dense", "compressed-tensors"),
        default="dense",
        help="dense safetensors (default), or compressed-tensors' sparse-bitmask / sparse-24-bitmask (2:4 runs) "
        "with its compression config in config.json, as llm-compressor writes it; pip install 'exert_ds[deploy]'",
    )
    inspect = command("inspect", INSPECT_HELP)
    inspect.add_argument(
        "path",
        metavar="CKPT",
        help="output_dir/checkpoints/step-… (a training checkpoint), output_dir/checkpoints (its latest) or "
        "output_dir/expert (the sparse expert)",
    )
    add_analyze_parser(sub)
    return parser


def run_command(args: argparse.Namespace, rest: list[str]) -> int:
    """Import the command's module and run it; its exit status."""
    if args.command == "inspect":
        from exert_ds.storage.inspection import inspect_command

        return inspect_command(args)
    if args.command == "export":
        from exert_ds.storage.export import export_command

        return export_command(args)
    if args.command == "eval":
        from exert_ds.evaluation.evaluate import eval_command

        return eval_command(rest, verbose=args.verbose)
    if args.command == "analyze":
        from exert_ds.analysis.command import analyze_command

        return analyze_command(args)
    from exert_ds.config import load_config

    cfg = load_config(args.config, _overrides(args.set))
    from exert_ds.runtime.dist import launched_rank, set_verbosity, shutdown_distributed
    from exert_ds.train import trainer  # torch, deepspeed and peft once the config is known to be good

    set_verbosity(args.verbose, launched_rank())
    if args.command == "train":
        trainer.train(cfg, resume=args.resume)
    else:
        trainer.prune_once(cfg, adapter=args.adapter)
    shutdown_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "eval":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command is None:
        parser.print_help()
        return 2
    from exert_ds.runtime.dist import launched_rank, quiet_other_ranks

    quiet_other_ranks(launched_rank())
    try:
        code = run_command(args, rest)
    except ConfigError as err:  # bad input: one line, same on every rank
        message = " ".join(str(err).split())
        print(f"exert-ds: error: {message}", file=sys.stderr)
        return 2
    if code == 0:  # every file written and closed: skip the interpreter teardown that could abort a launched rank
        from exert_ds.runtime.dist import exit_launched_rank

        exit_launched_rank(0)
    return code
