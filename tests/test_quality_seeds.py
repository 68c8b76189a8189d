"""eval/quality/seeds.py: the seed rules of evaluation.md on hand-made results with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval" / "quality"))
import seeds  # noqa: E402


def result(acc_gold_pred: dict[str, tuple[list[str], list[str]]], ppl: float, ci_low: float = 0.9) -> dict:
    tasks = {}
    for task, (gold, pred) in acc_gold_pred.items():
        g, p = np.array(gold), np.array(pred)
        tasks[task] = {
            "domain": "health",
            "n": len(gold),
            "gold": gold,
            "predictions": pred,
            "accuracy": float(np.mean(g == p)),
            "macro_f1": float(np.mean(g == p)),
            "ci95": {"accuracy": [ci_low, 1.0], "macro_f1": [ci_low, 1.0]},
            "majority_accuracy": 0.5,
            "majority_macro_f1": 0.33,
        }
    return {"tasks": tasks, "perplexity": {"health": {"perplexity": ppl, "domain": "health"}}}


GOLD = ["a", "b"] * 50


def test_perplexity_win_needs_every_seed():
    a = {0: result({}, 10.0), 1: result({}, 11.0), 2: result({}, 12.5)}
    b = {0: result({}, 10.5), 1: result({}, 11.5), 2: result({}, 12.0)}  # b wins seed 2
    assert not seeds.beats_on_perplexity(a, b, "health")  # a's mean is lower, but not in every seed
    b[2] = result({}, 13.0)
    assert seeds.beats_on_perplexity(a, b, "health") and not seeds.beats_on_perplexity(b, a, "health")


def test_paired_bootstrap_known_answers():
    right = {s: result({"t": (GOLD, GOLD)}, 1.0) for s in range(3)}
    half = {s: result({"t": (GOLD, ["a"] * 100)}, 1.0) for s in range(3)}
    point, (low, high) = seeds.paired_bootstrap(right, half, ["t"], resamples=500)
    assert point == pytest.approx(0.5) and 0.3 < low <= 0.5 <= high < 0.7
    assert seeds.beats_on_accuracy(right, half, ["t"], resamples=500)
    assert not seeds.beats_on_accuracy(half, right, ["t"], resamples=500)
    same, (low, high) = seeds.paired_bootstrap(half, half, ["t"], resamples=200)
    assert same == 0 and low == high == 0  # paired: identical predictions differ by exactly 0 in every draw
    assert not seeds.beats_on_accuracy(half, half, ["t"], resamples=200)


def test_learned_needs_the_interval_above_majority_in_every_seed():
    dense = {0: result({"t": (GOLD, GOLD)}, 1.0, ci_low=0.8), 1: result({"t": (GOLD, GOLD)}, 1.0, ci_low=0.45)}
    assert not seeds.learned(dense, "t")
    dense[1] = result({"t": (GOLD, GOLD)}, 1.0, ci_low=0.6)
    assert seeds.learned(dense, "t")


def test_summary_and_relative_mean():
    cells = {0: result({"t": (GOLD, ["a"] * 100)}, 10.0), 1: result({"t": (GOLD, GOLD)}, 12.0)}
    dense = {0: result({"t": (GOLD, GOLD)}, 8.0), 1: result({"t": (GOLD, GOLD)}, 8.0)}
    summary = seeds.seed_summary(cells, "health", ["t"])
    assert summary["seeds"] == [0, 1]
    assert summary["domain_ppl"] == {"per_seed": {"0": 10.0, "1": 12.0}, "mean": 11.0}
    assert summary["domain_task_mean"] == {"per_seed": {"0": 0.5, "1": 1.0}, "mean": 0.75}
    assert seeds.relative_task_mean(cells, dense, ["t"]) == pytest.approx(0.75)


def test_missing_scores_are_one_line():
    bare = {"tasks": {"t": {"accuracy": 1.0}}}
    with pytest.raises(ValueError, match="--save-scores"):
        seeds.correct(bare, "t")


def test_table_writes_the_summary_and_plot_from_a_raw_file(tmp_path):
    """table.py on a raw file of two seeds: quality_summary.json holds every seed and the mean, the default's
    verdicts follow the rules, and the PNG is written."""
    import json
    import subprocess

    def cell(method, sparsity, seed, ppl, pred):
        ev = result({"medquad_qtype": (GOLD, pred)}, ppl)
        ev["perplexity"]["general"] = {"perplexity": 2 * ppl, "domain": None}
        return {"domain": "health", "method": method, "sparsity": sparsity, "seed": seed, "eval": ev}

    cells = {}
    for s in (0, 1):
        cells[f"d{s}"] = cell("dense_lora", 0.0, s, 8.0, GOLD)
        cells[f"x{s}"] = cell("foresight_pbs_hessian", 0.5, s, 10.0 + s, GOLD)
        cells[f"g{s}"] = cell("lora_then_sparsegpt", 0.5, s, 10.5 + s, ["a"] * 100)
    # run_all.py --trace-events: the stages before and after each event, in any order in the raw file
    stages = {"after-1": 9.5, "before-0": 8.5, "after-0": 9.0, "before-1": 8.75}
    cells["x0"]["trace"] = {k: result({"medquad_qtype": (GOLD, GOLD)}, v) for k, v in stages.items()}
    raw = {"date": "d", "command": "c", "device": "cpu", "gpus": 0, "jobs_per_gpu": 1, "seconds": 1.0,
           "seeds": [0, 1], "versions": {}, "cells": cells}  # fmt: skip
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    script = Path(__file__).resolve().parents[1] / "eval" / "quality" / "table.py"
    out = tmp_path / "quality"
    subprocess.run([sys.executable, str(script), str(tmp_path / "raw.json"), "--out", str(out),
                    "--analysis", str(tmp_path / "none.md")], check=True, capture_output=True)  # fmt: skip
    summary = json.loads((tmp_path / "quality_summary.json").read_text())
    assert summary["default"] == "foresight_pbs_hessian" and summary["sparsegpt"] == "lora_then_sparsegpt"
    entry = summary["health"]["0.5"]["foresight_pbs_hessian"]
    assert entry["seeds"] == [0, 1]
    assert entry["domain_ppl"] == {"per_seed": {"0": 10.0, "1": 11.0}, "mean": 10.5}
    assert entry["domain_task_mean"]["mean"] == 1.0
    assert summary["health"]["0.5"]["lora_then_sparsegpt"]["domain_task_mean"]["mean"] == 0.5
    verdict = summary["verdicts"]["health"]["0.5"]["foresight_pbs_hessian"]["sparsegpt"]
    assert verdict["domain_ppl"] is True and verdict["loses_domain_ppl"] is False
    assert verdict["domain_task_mean"] is True and verdict["loses_domain_task_mean"] is False
    assert (tmp_path / "quality_relative.png").stat().st_size > 1000
    markdown = (tmp_path / "quality.md").read_text()
    assert "seed means and every seed" in markdown
    trace = markdown.split("## Before and after each event")[1].split("\n## ")[0]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in trace.splitlines() if line.startswith("| ")][1:]
    assert rows == ["before-0", "after-0", "before-1", "after-1", "final"]
    assert "| after-1 | 1.000 (0.500) | 9.50 |" in trace


def test_merge_raw_keeps_every_cell_later_leases_win_and_lists_the_leases():
    """eval/quality/merge_raw.py: cells of two leases in one raw document; a cell run again replaces the older one,
    and table.py's header reads each lease's device, command and seconds."""
    import merge_raw

    def lease(date: str, gpus: int, cells: dict) -> dict:
        return {"date": date, "command": f"run {date}", "device": "H200", "gpus": gpus, "jobs_per_gpu": 7,
                "seconds": 10.0, "seeds": [0], "versions": {}, "cells": cells}  # fmt: skip

    first = lease("d1", 2, {"a-s0": {"seed": 0, "v": 1}, "b-s0": {"seed": 0, "v": 1}})
    second = lease("d2", 1, {"b-s0": {"seed": 0, "v": 2}, "c-s1": {"seed": 1, "v": 2}})
    merged = merge_raw.merge([first, second])
    assert {k: c["v"] for k, c in merged["cells"].items()} == {"a-s0": 1, "b-s0": 2, "c-s1": 2}
    assert [x["date"] for x in merged["leases"]] == ["d1", "d2"] and merged["seconds"] == 20.0
    assert merged["seeds"] == [0, 1] and merged["device"] == "H200 × 2 / H200 × 1"
    again = merge_raw.merge([merged, lease("d3", 1, {})])  # a merged file merges again without losing its leases
    assert [x["date"] for x in again["leases"]] == ["d1", "d2", "d3"] and len(again["cells"]) == 3
