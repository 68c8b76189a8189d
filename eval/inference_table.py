"""eval/results/inference.md from the raw JSON of eval/bench_inference.py: per shape, the per-layer times with
sparse/dense speed-ups, whole-model prefill tokens/s and decode latency per token, each ratio taken within the one
run; a kernel's error is shown in place of its number.

    python3 eval/inference_table.py RAW.json --out eval/results/inference.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SPARSE = (("cusparselt", "cuSPARSELt"), ("cutlass", "CUTLASS"))
ERRORS: dict[str, int] = {}  # error text → footnote number, in order of first appearance


def _note(error: str) -> str:
    number = ERRORS.setdefault(error, len(ERRORS) + 1)
    return f"error [{number}]"


def _cell(row: dict | None, value: str, dense: float | None, higher_is_better: bool, scale: float = 1.0) -> str:
    """`value` of `row` (× `scale`), with its speed-up over dense; or the row's error; or 'not measured'."""
    if row is None:
        return "not measured"
    if "error" in row:
        return _note(row["error"])
    number = row[value]
    text = f"{number * scale:.3g}"
    if dense:
        speedup = number / dense if higher_is_better else dense / number
        text += f" ({speedup:.2f}×)"
    return text


def _find(rows: list[dict], **keys: Any) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)


def _dense_value(row: dict | None, key: str) -> float | None:
    return row[key] if row is not None and key in row else None


def layer_table(rows: list[dict]) -> list[str]:
    lines = [
        "| role | out × in | phase | tokens | dense ms | cuSPARSELt ms (speed-up) | CUTLASS ms (speed-up) | matches dense (bf16) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    keys = list(dict.fromkeys((r["role"], r["phase"], r["tokens"]) for r in rows))
    for role, phase, tokens in keys:
        group = [r for r in rows if (r["role"], r["phase"], r["tokens"]) == (role, phase, tokens)]
        dense = _find(group, variant="dense")
        base = _dense_value(dense, "seconds")
        cells = [_cell(_find(group, variant=v), "seconds", base, False, 1e3) for v, _ in SPARSE]
        matches = [
            f"{label} {'yes' if r['match_bf16'] else 'NO'} (rel {r['rel_error']:.1e})"
            for v, label in SPARSE
            if (r := _find(group, variant=v)) is not None and "match_bf16" in r
        ]
        out_f, in_f = group[0]["shape"]
        lines.append(
            f"| {role} | {out_f} × {in_f} | {phase} | {tokens} | {_cell(dense, 'seconds', None, False, 1e3)} | "
            f"{' | '.join(cells)} | {', '.join(matches) or '—'} |"
        )
    return lines


def model_tables(model: dict) -> list[str]:
    lines = [
        "| prefill | dense tokens/s | cuSPARSELt tokens/s (speed-up) | CUTLASS tokens/s (speed-up) |",
        "|---|---:|---:|---:|",
    ]
    for batch in dict.fromkeys(r["batch"] for r in model["prefill"]):
        group = [r for r in model["prefill"] if r["batch"] == batch]
        dense = _find(group, variant="dense")
        base = _dense_value(dense, "tokens_per_s")
        cells = [_cell(_find(group, variant=v), "tokens_per_s", base, True) for v, _ in SPARSE]
        lines.append(
            f"| {batch} × {group[0]['tokens'] // batch} | {_cell(dense, 'tokens_per_s', None, True)} | "
            f"{' | '.join(cells)} |"
        )
    lines += [
        "",
        "| decode | dense ms/token | cuSPARSELt ms/token (speed-up) | CUTLASS ms/token (speed-up) |",
        "|---|---:|---:|---:|",
    ]
    for batch in dict.fromkeys(r["batch"] for r in model["decode"]):
        group = [r for r in model["decode"] if r["batch"] == batch]
        dense = _find(group, variant="dense")
        base = _dense_value(dense, "seconds_per_token")
        cells = [_cell(_find(group, variant=v), "seconds_per_token", base, False, 1e3) for v, _ in SPARSE]
        lines.append(f"| batch {batch} | {_cell(dense, 'seconds_per_token', None, False, 1e3)} | {' | '.join(cells)} |")
    for row in model.get("logits", []):
        lines.append(
            f"\nLast-position logits, {row['variant']} against dense: relative error {row['rel_error']:.2e}, "
            f"top-1 agreement {row['top1']:.3f}."
        )
    return lines


def render(results: dict) -> str:
    env = results["environment"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "cuda", "cusparselt", "transformers") if env.get(k))
    ERRORS.clear()
    lines = [
        "# 2:4 sparse inference against dense (eval/bench_inference.py)",
        "",
        f"- Command: `{results['command']}`",
        f"- Device: {env['device']} ({env['host']}); {versions}",
        f"- Date: {results['date']}; run time {results.get('seconds', float('nan')):.0f} s",
        "- Random bf16 weights, every projection pruned 2:4 by magnitude; dense and sparse use the same zeros. "
        "Speed-ups are sparse against dense in this run (ms: lower is better; tokens/s: higher is better).",
        "",
    ]
    for name, entry in results["shapes"].items():
        lines += [f"## {name}", "", "### Per linear layer (one `F.linear`)", "", *layer_table(entry["layers"]), ""]
        if "model" in entry:
            lines += ["### Whole model (HF forward, sdpa attention)", "", *model_tables(entry["model"]), ""]
        elif "model_error" in entry:
            lines += [f"Whole model: {_note(entry['model_error'])}", ""]
    if ERRORS:
        lines += ["## Errors, as measured", ""]
        lines += [f"- [{n}] {text}".replace("|", "\\|") for text, n in ERRORS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", help="JSON written by eval/bench_inference.py")
    parser.add_argument("--out", default="eval/results/inference.md")
    args = parser.parse_args(argv)
    text = render(json.loads(Path(args.raw).read_text()))
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
