"""`exert-ds` command line: one subcommand per job; each reads a run YAML (see README)."""

from __future__ import annotations

import argparse
import sys

from exert_ds.config import load_config, parse_yaml
from exert_ds.errors import ConfigError
from exert_ds.evaluation.evaluate import add_eval_parser, eval_command
from exert_ds.runtime.dist import shutdown_distributed
from exert_ds.storage.export import add_export_parser, export_command
from exert_ds.storage.inspection import add_inspect_parser, inspect_command


def _overrides(pairs: list[str]) -> dict:
    """`--set prune.sparsity=0.4` pairs → {"prune.sparsity": 0.4} (values parsed as YAML scalars)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set prune.sparsity=0.4")
        out[key] = parse_yaml(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exert-ds",
        description="EfficientXpert (ForeSight Mask + Partial Brain Surgeon) inside DeepSpeed ZeRO-3. Start the "
        "distributed commands with a launcher: deepspeed, torchrun, mpirun or srun (see launch/).",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
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

    train = with_config(
        "train", "LoRA fine-tuning under ZeRO-3 with the EfficientXpert prune schedule; writes the sparse expert"
    )
    train.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="continue from a checkpoint: 'auto' = output_dir/checkpoints/latest if there is one, or a checkpoint dir",
    )
    prune = with_config("prune", "one-shot prune event (foresight, wanda, magnitude, sparsegpt) on a dense model")
    prune.add_argument("--adapter", default=None, help="a trained PEFT adapter directory to merge before pruning")
    add_eval_parser(sub)
    add_export_parser(sub)
    add_inspect_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "eval":
            return eval_command(args)
        if args.command == "export":
            return export_command(args)
        if args.command == "inspect":
            return inspect_command(args)
        cfg = load_config(args.config, _overrides(args.set))
        from exert_ds.train import trainer  # heavy imports (deepspeed) only once the config is known to be good

        if args.command == "train":
            trainer.train(cfg, resume=args.resume)
        elif args.command == "prune":
            trainer.prune_once(cfg, adapter=args.adapter)
        shutdown_distributed()
    except ConfigError as err:  # bad input: one line, same on every rank
        message = " ".join(str(err).split())
        print(f"exert-ds: error: {message}", file=sys.stderr)
        return 2
    return 0
