"""eval/compare.py: the relative-performance table of two hand-made results files against hand-computed ratios."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from exert_ds.evaluation.compare import compare
from tests.launch import REPO


def task(domain: str, acc: float, f1: float, n: int = 100, source: str = "d.jsonl") -> dict:
    return {
        "domain": domain,
        "source": source,
        "n": n,
        "accuracy": acc,
        "macro_f1": f1,
        "ci95": {"accuracy": [acc - 0.05, acc + 0.05], "macro_f1": [f1 - 0.05, f1 + 0.05]},
        "majority_accuracy": 0.5,
        "majority_macro_f1": 0.3,
    }


def sparsity(value: float, promised: float | None = None, passed: bool | None = None) -> dict:
    report = {"blocks": [{"q": value, "down": value - 0.01}, {"q": value + 0.01, "down": value}], "overall": value}
    if promised is not None:
        report["check"] = {"promised": promised, "passed": passed, "failures": []}
    return report


DENSE = {
    "model": "dense",
    "tasks": {
        "pubmedqa": task("health", 0.60, 0.40),
        "medquad_qtype": task("health", 0.50, 0.20),
        "cuad": task("legal", 0.80, 0.78),
    },
    "perplexity": {
        "medquad_answers": {"domain": "health", "perplexity": 10.0},
        "general": {"domain": "general", "perplexity": 20.0},
    },
    "sparsity": sparsity(0.0),
}
SPARSE = {
    "model": "sparse",
    "tasks": {
        "pubmedqa": task("health", 0.54, 0.30),
        "medquad_qtype": task("health", 0.45, 0.19),
        "cuad": task("legal", 0.72, 0.70),
    },
    "perplexity": {
        "medquad_answers": {"domain": "health", "perplexity": 12.5},
        "general": {"domain": "general", "perplexity": 25.0},
    },
    "sparsity": sparsity(0.5, 0.5, True),
}


def test_ratios_and_domain_means_by_hand():
    markdown, table = compare({"dense": DENSE, "sparse": SPARSE}, reference="dense")
    row = table["rows"]["sparse"]
    assert row["tasks"]["pubmedqa"]["relative"] == pytest.approx(0.9)
    assert row["tasks"]["medquad_qtype"]["relative"] == pytest.approx(0.9)
    assert row["tasks"]["cuad"]["relative"] == pytest.approx(0.9)
    assert row["perplexity"]["medquad_answers"]["relative"] == pytest.approx(0.8)  # 10 / 12.5
    assert row["perplexity"]["general"]["relative"] == pytest.approx(0.8)
    assert row["domains"] == pytest.approx({"health": 0.9, "legal": 0.9})
    assert table["rows"]["dense"]["domains"] == pytest.approx({"health": 1.0, "legal": 1.0})
    assert row["sparsity"] == {"overall": 0.5, "min": 0.49, "max": 0.51, "promised": 0.5, "check_passed": True}
    f1 = compare({"dense": DENSE, "sparse": SPARSE}, reference="dense", metric="macro_f1")[1]["rows"]["sparse"]
    assert f1["domains"]["health"] == pytest.approx((0.75 + 0.95) / 2)
    assert "| sparse | 0.500 (0.490–0.510) | 0.540 [0.490, 0.590] (0.900×)" in markdown
    assert "| dense (reference) |" in markdown


def test_broken_promise_is_flagged_and_different_examples_refused():
    broken = {**SPARSE, "sparsity": sparsity(0.327, 0.4, False)}
    markdown, _ = compare({"dense": DENSE, "merged": broken}, reference="dense")
    assert "**≠ promised 0.4**" in markdown
    fewer = {**SPARSE, "tasks": {**SPARSE["tasks"], "cuad": task("legal", 0.7, 0.7, n=50)}}
    with pytest.raises(ValueError, match="cuad has n=50"):
        compare({"dense": DENSE, "sparse": fewer}, reference="dense")
    with pytest.raises(ValueError, match="reference 'lora'"):
        compare({"dense": DENSE}, reference="lora")


def test_script_writes_markdown_and_json(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(DENSE))
    (tmp_path / "s.json").write_text(json.dumps(SPARSE))
    out = tmp_path / "table"
    proc = subprocess.run(
        [
            sys.executable,
            "eval/compare.py",
            f"dense={tmp_path / 'd.json'}",
            f"sparse={tmp_path / 's.json'}",
            "--reference",
            "dense",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == out.with_suffix(".md").read_text().strip()
    assert json.loads(out.with_suffix(".json").read_text())["rows"]["sparse"]["domains"]["legal"] == pytest.approx(0.9)
