"""`exert-ds` command line: one subcommand per job."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exert-ds",
        description="EfficientXpert (ForeSight Mask + Partial Brain Surgeon) inside DeepSpeed ZeRO-3.",
    )
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0
