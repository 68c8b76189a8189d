"""Seed statistics of the quality table (evaluation.md, issue 20): seed means, "learned" tasks, the paired
bootstrap over examples and seeds, and the "A beats B" rule. Pure functions over run_all.py's raw cells.

A cell is one `exert-ds eval` result (`--save-scores`: per-example `gold` and `predictions` per task) of one
method, domain, sparsity and seed. Rules (evaluation.md):
- a labelled task counts towards a domain mean only where dense LoRA learned it: in every seed, its accuracy's 95%
  bootstrap interval lies above the majority-class accuracy on the same examples;
- "A beats B" on perplexity: A's seed mean is lower and A is lower in every seed;
- "A beats B" on accuracy (a task, or the mean over a domain's learned tasks): a paired bootstrap that resamples the
  seeds and, within each task, the examples (the same draw for A and B) puts the 95% interval of mean(A) − mean(B)
  above 0.
"""

from __future__ import annotations

import numpy as np

Cells = dict[int, dict]  # seed → eval result


def correct(result: dict, task: str) -> np.ndarray:
    """0/1 per example of one task; needs the per-example scores (`exert-ds eval --save-scores`)."""
    entry = result["tasks"][task]
    if "gold" not in entry or "predictions" not in entry:
        raise ValueError(f"task {task}: no per-example gold/predictions; evaluate with --save-scores")
    return (np.asarray(entry["gold"]) == np.asarray(entry["predictions"])).astype(np.float64)


def learned(dense: Cells, task: str) -> bool:
    """Dense LoRA beats the majority baseline outside its interval in every seed."""
    return all(r["tasks"][task]["ci95"]["accuracy"][0] > r["tasks"][task]["majority_accuracy"] for r in dense.values())


def task_mean(result: dict, tasks: list[str]) -> float:
    return float(np.mean([result["tasks"][t]["accuracy"] for t in tasks]))


def perplexity(result: dict, name: str) -> float:
    return float(result["perplexity"][name]["perplexity"])


def beats_on_perplexity(a: Cells, b: Cells, name: str) -> bool:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return False
    pa, pb = ([perplexity(c[s], name) for s in seeds] for c in (a, b))
    return float(np.mean(pa)) < float(np.mean(pb)) and all(x < y for x, y in zip(pa, pb, strict=True))


def paired_bootstrap(
    a: Cells, b: Cells, tasks: list[str], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, list[float]]:
    """(mean difference, [low, high]) of the mean over `tasks` of accuracy(A) − accuracy(B), resampling seeds and,
    per task, examples — the same indices for A and B, and for every seed (the examples are the same in every
    seed: `--max-examples` takes a fixed subset)."""
    seeds = sorted(set(a) & set(b))
    if not seeds or not tasks:
        raise ValueError("paired bootstrap needs at least one common seed and one task")
    # diff[t]: (seeds, examples) of correct_A − correct_B
    diff = {t: np.stack([correct(a[s], t) - correct(b[s], t) for s in seeds]) for t in tasks}
    point = float(np.mean([d.mean() for d in diff.values()]))
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for k in range(resamples):
        pick = rng.integers(0, len(seeds), size=len(seeds))
        draws[k] = np.mean([d[pick][:, rng.integers(0, d.shape[1], size=d.shape[1])].mean() for d in diff.values()])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return point, [float(low), float(high)]


def beats_on_accuracy(a: Cells, b: Cells, tasks: list[str], resamples: int = 2000) -> bool:
    if not tasks or not set(a) & set(b):
        return False
    return paired_bootstrap(a, b, tasks, resamples)[1][0] > 0


def seed_summary(cells: Cells, domain_set: str, tasks: list[str]) -> dict:
    """The quality_summary.json entry of one method: per-seed and mean domain perplexity and domain-task mean."""
    seeds = sorted(cells)
    ppl = {str(s): perplexity(cells[s], domain_set) for s in seeds}
    out: dict = {"seeds": seeds, "domain_ppl": {"per_seed": ppl, "mean": float(np.mean(list(ppl.values())))}}
    if tasks:
        acc = {str(s): task_mean(cells[s], tasks) for s in seeds}
        out["domain_task_mean"] = {"per_seed": acc, "mean": float(np.mean(list(acc.values())))}
    return out


def relative_task_mean(cells: Cells, dense: Cells, tasks: list[str]) -> float | None:
    """Seed mean of mean_t accuracy(model)/accuracy(dense LoRA, same seed) over the learned tasks."""
    seeds = sorted(set(cells) & set(dense))
    if not seeds or not tasks:
        return None
    return float(
        np.mean(
            [
                np.mean([cells[s]["tasks"][t]["accuracy"] / dense[s]["tasks"][t]["accuracy"] for t in tasks])
                for s in seeds
            ]
        )
    )
