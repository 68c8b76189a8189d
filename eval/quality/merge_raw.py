"""Merge run_all.py's raw JSONs from several leases into one, for table.py: cells by name (a later file's cell
replaces an earlier one of the same name), the leases' commands, dates and devices listed in order, seconds summed.

  python3 eval/quality/merge_raw.py eval/results/quality_raw.json NEW/quality_raw.json --out eval/results/quality_raw.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(raws: list[dict]) -> dict:
    """One raw document holding every cell of `raws` (later wins) and each lease's provenance under `leases`."""
    merged = dict(raws[0])
    leases = list(merged.pop("leases", [])) or [{k: v for k, v in raws[0].items() if k != "cells"}]
    cells = dict(raws[0]["cells"])
    for raw in raws[1:]:
        leases += raw.get("leases") or [{k: v for k, v in raw.items() if k != "cells"}]
        cells.update(raw["cells"])
    merged.update(
        cells=cells,
        leases=leases,
        date=" ; ".join(str(lease["date"]) for lease in leases),
        command=" ; then, in another lease: ".join(lease["command"] for lease in leases),
        seconds=sum(float(lease["seconds"]) for lease in leases),
        seeds=sorted({int(c.get("seed", 0)) for c in cells.values()}),
        device=" / ".join(dict.fromkeys(f"{lease['device']} × {lease['gpus']}" for lease in leases)),
        gpus=leases[-1]["gpus"],
    )
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    merged = merge([json.loads(p.read_text()) for p in args.raw])
    args.out.write_text(json.dumps(merged, indent=1))
    print(f"wrote {args.out}: {len(merged['cells'])} cells from {len(merged['leases'])} leases")


if __name__ == "__main__":
    main()
