"""Relative-performance table (evaluation.md) from several `exert-ds eval` results files, as markdown + JSON.

Usage: python eval/compare.py dense=dense.json sparse50=sparse50.json --reference dense --out eval/results/table
writes table.md and table.json and prints the markdown. The table itself is exert_ds.evaluation.compare.compare, which
other scripts (the quality table) call with results dicts they already hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from exert_ds.evaluation.compare import compare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", metavar="LABEL=FILE", help="a labelled results JSON of exert-ds eval")
    parser.add_argument("--reference", required=True, help="the LABEL of the dense LoRA expert")
    parser.add_argument("--metric", default="accuracy", choices=("accuracy", "macro_f1"))
    parser.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    results = {}
    for pair in args.results:
        label, sep, path = pair.partition("=")
        if not sep or not Path(path).is_file():
            print(f"compare.py: error: {pair!r} is not LABEL=FILE of an existing results JSON", file=sys.stderr)
            return 2
        results[label] = json.loads(Path(path).read_text())
    try:
        markdown, table = compare(results, args.reference, args.metric)
    except ValueError as err:
        print(f"compare.py: error: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(f"{args.out}.md").write_text(markdown)
        Path(f"{args.out}.json").write_text(json.dumps(table, indent=1))
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
