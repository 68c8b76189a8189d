"""The relative-performance table of evaluation.md from several `exert-ds eval` results.

relative performance = metric(model) / metric(reference) per labelled task (the reference is the dense LoRA
expert), ppl(reference) / ppl(model) per perplexity set, and per domain the mean over that domain's labelled
tasks. Every row carries the measured sparsity of its matrices (overall, and the least and most sparse matrix)
so a model that silently densified is seen next to its numbers. Rows compared on different example sets
(another --max-examples, another data file) are refused rather than compared.
"""

from __future__ import annotations

from typing import Any


def _sparsity(result: dict) -> dict[str, Any]:
    report = result.get("sparsity") or {}
    matrices = [v for block in report.get("blocks", []) for v in block.values()]
    check = report.get("check")
    return {
        "overall": report.get("overall"),
        "min": min(matrices) if matrices else None,
        "max": max(matrices) if matrices else None,
        "promised": check["promised"] if check else None,
        "check_passed": check["passed"] if check else None,
    }


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def compare(results: dict[str, dict], reference: str, metric: str = "accuracy") -> tuple[str, dict[str, Any]]:
    """(markdown, json) of the table; `results` maps a row label to a results dict, `reference` names the dense
    LoRA row. `metric` is the labelled tasks' metric (accuracy or macro_f1)."""
    if reference not in results:
        raise ValueError(f"reference {reference!r} is not among the results ({', '.join(results)})")
    ref = results[reference]
    tasks = list(dict.fromkeys(t for r in results.values() for t in r.get("tasks", {})))
    sets = list(dict.fromkeys(s for r in results.values() for s in r.get("perplexity", {})))
    domain_of = {t: r["tasks"][t]["domain"] for r in results.values() for t in r.get("tasks", {})}
    domains = list(dict.fromkeys(domain_of[t] for t in tasks))
    for label, result in results.items():
        for task, got in result.get("tasks", {}).items():
            want = ref.get("tasks", {}).get(task)
            if want and (got["n"] != want["n"] or got.get("source") != want.get("source")):
                raise ValueError(
                    f"{label}: task {task} has n={got['n']} from {got.get('source')} but the reference has "
                    f"n={want['n']} from {want.get('source')}; evaluate both on the same examples"
                )
    rows = {}
    for label, result in results.items():
        row: dict[str, Any] = {
            "model": result.get("model"),
            "sparsity": _sparsity(result),
            "tasks": {},
            "perplexity": {},
        }
        for task in tasks:
            got, want = result.get("tasks", {}).get(task), ref.get("tasks", {}).get(task)
            if got is None:
                continue
            row["tasks"][task] = {
                "domain": got["domain"],
                metric: got[metric],
                "ci95": got["ci95"][metric],
                "n": got["n"],
                "majority": got[f"majority_{metric}"],
                "relative": _ratio(got[metric], want[metric] if want else None),
            }
        for name in sets:
            got, want = result.get("perplexity", {}).get(name), ref.get("perplexity", {}).get(name)
            if got is None:
                continue
            row["perplexity"][name] = {
                "domain": got["domain"],
                "perplexity": got["perplexity"],
                "relative": _ratio(want["perplexity"] if want else None, got["perplexity"]),
            }
        row["domains"] = {}
        for domain in domains:
            rel = [c["relative"] for c in row["tasks"].values() if c["domain"] == domain]
            row["domains"][domain] = sum(rel) / len(rel) if rel and None not in rel else None
        rows[label] = row
    table = {"reference": reference, "metric": metric, "tasks": tasks, "perplexity_sets": sets, "domains": domains}
    table["rows"] = rows
    return _markdown(table), table


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _markdown(table: dict[str, Any]) -> str:
    metric, ref = table["metric"], table["reference"]
    head = ["model", "sparsity (min–max)"]
    head += [f"{t} {metric} [95% CI] (rel.)" for t in table["tasks"]]
    head += [f"ppl {s} (rel.)" for s in table["perplexity_sets"]]
    head += [f"{d} mean rel." for d in table["domains"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in table["rows"].items():
        sp = row["sparsity"]
        spars = f"{_num(sp['overall'])} ({_num(sp['min'])}–{_num(sp['max'])})"
        if sp["check_passed"] is False:
            spars += f" **≠ promised {sp['promised']}**"
        cells = [f"{label} (reference)" if label == ref else label, spars]
        for task in table["tasks"]:
            c = row["tasks"].get(task)
            cells.append(
                "—"
                if c is None
                else f"{_num(c[metric])} [{_num(c['ci95'][0])}, {_num(c['ci95'][1])}] ({_num(c['relative'])}×)"
            )
        for name in table["perplexity_sets"]:
            c = row["perplexity"].get(name)
            cells.append("—" if c is None else f"{_num(c['perplexity'], 2)} ({_num(c['relative'])}×)")
        cells += [_num(row["domains"][d]) for d in table["domains"]]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"\nrel. = {metric}(model) / {metric}({ref}) per task, ppl({ref}) / ppl(model) per perplexity set; "
        "domain mean over the domain's labelled tasks. Sparsity: fraction of zeros over all pruned matrices "
        "(least and most sparse matrix), measured from the weights.\n"
    )
    return "\n".join(lines) + "\n" + note
