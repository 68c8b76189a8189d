"""eval/plain_lora_anchor.py, eval/bench_scale.py and eval/step_anchor_table.py (issue 19) on CPU with a tiny config:
the table divides each exert_ds setting by the anchor's same setting from the same lease, and perf_summary.json
holds those ratios for the chosen levers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

from tests.launch import cpu_env, deepspeed_cpu

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "eval" / "configs" / "tiny_llama_cpu")


@pytest.mark.distributed
def test_anchor_and_engine_steps_become_same_lease_ratios(tmp_path):
    lease = tmp_path / "call1"
    lease.mkdir()
    anchor = [sys.executable, str(REPO / "eval" / "plain_lora_anchor.py"), "--config-dir", TINY, "--seq", "16"]
    anchor += ["--variant", "8:0", "--variant", "4:1", "--warmup", "1", "--steps", "2", "--calib-forward", "4:16:2"]
    subprocess.run([*anchor, "--out", str(lease / "anchor_7b.json")], check=True, env=cpu_env(), capture_output=True)
    bench = [str(REPO / "eval" / "bench_scale.py"), "--config-dir", TINY, "--ds-config", str(REPO / "ds_configs" /
             "zero3_cpu.json"), "--dtype", "float32", "--seq", "16", "--micro-batch", "4", "--grad-ckpt", "--warmup",
             "1", "--steps", "2", "--plain-only", "--variant", "nockpt:8", "--calib-samples", "4", "--calib-seq", "16"]  # fmt: skip
    deepspeed_cpu([*bench, "--out", str(lease / "exert_7b.json")], ranks=1)
    out, summary = tmp_path / "perf_anchor.md", tmp_path / "perf_summary.json"
    import step_anchor_table

    doc = step_anchor_table.main([
        f"L1={lease}", "--summary-lease", "L1", "--summary-levers", "adapters in the model's dtype", "--summary-date", "d",
        "--summary-extra", '{"scaling_2gpu": null}', "--out", str(out), "--summary", str(summary),
    ])  # fmt: skip
    anchors = {r["variant"]: r for r in json.loads((lease / "anchor_7b.json").read_text())["results"]}
    plain = {m["variant"]: m for m in json.loads((lease / "exert_7b.json").read_text())["measurements"]}
    want = {
        "mb8_norecompute": plain["nockpt:8"]["median_step_s"] / anchors["8:0"]["s_per_step_median"],
        "mb4_recompute": plain["primary"]["median_step_s"] / anchors["4:1"]["s_per_step_median"],
    }
    assert json.loads(summary.read_text()) == doc
    assert doc["tiny_llama_cpu"]["step_over_anchor"] == {k: round(v, 3) for k, v in want.items()}
    assert doc["tiny_llama_cpu"]["scaling_2gpu"] is None and doc["tiny_llama_cpu"]["config"] == "adapters in the model's dtype"
    assert f"{want['mb8_norecompute']:.2f}×" in out.read_text()
