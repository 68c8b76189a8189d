"""lm-evaluation-harness on a sparse expert directory (no export), offline, with a local task YAML over a local
JSONL: lm-eval's log-likelihoods and accuracy equal `exert-ds eval`'s own scoring of the same prompts."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from exert_ds.cli import main
from exert_ds.storage.expert import write_expert
from tests.eval_data import prune_rows_by_magnitude, save_eval_model_dir, write_pubmedqa

pytest.importorskip("lm_eval")

LM_EVAL_TASK = """
task: tiny_pubmedqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Context: {{{{context}}}}\\nQuestion: {{{{question}}}}\\nAnswer (yes, no or maybe):"
doc_to_choice: ["yes", "no", "maybe"]
doc_to_target: "{{{{['yes', 'no', 'maybe'].index(label)}}}}"
metric_list:
  - metric: acc
"""

EXERT_TASK = """
tasks:
  - name: tiny_pubmedqa
    domain: health
    source: {data}
    split: null
    prompt: "Context: {{context}}\\nQuestion: {{question}}\\nAnswer (yes, no or maybe):"
    label_field: label
    verbalisations: {{yes: " yes", no: " no", maybe: " maybe"}}
"""


@pytest.fixture
def expert_and_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_eval_model_dir(tmp_path / "model")
    model = prune_rows_by_magnitude(AutoModelForCausalLM.from_pretrained(model_dir))
    expert = write_expert(model, AutoTokenizer.from_pretrained(model_dir), tmp_path / "expert", sparsity=0.5)
    rows = [json.loads(line) for line in write_pubmedqa(tmp_path / "all.jsonl", n=16).read_text().splitlines()]
    data = tmp_path / "pubmedqa_test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "lm_tasks").mkdir()
    (tmp_path / "lm_tasks" / "tiny_pubmedqa.yaml").write_text(LM_EVAL_TASK.format(data=data))
    (tmp_path / "exert_tasks.yaml").write_text(EXERT_TASK.format(data=data))
    return expert, tmp_path


def exert_ds_scores(expert: Path, tmp: Path) -> dict:
    out = tmp / "exert.json"
    args = ["eval", "--model", str(expert), "--task-file", str(tmp / "exert_tasks.yaml"), "--save-scores"]
    assert main([*args, "--bootstrap", "50", "--out", str(out)]) == 0
    return json.loads(out.read_text())["tasks"]["tiny_pubmedqa"]


def test_registered_model_reads_the_expert_and_scores_like_exert_ds_eval(expert_and_tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import exert_ds.evaluation.lm_eval_model  # noqa: F401  (registers "exert_ds")

    expert, tmp = expert_and_tasks
    ours = exert_ds_scores(expert, tmp)
    out = lm_eval.simple_evaluate(
        model="exert_ds",
        model_args=f"expert={expert}",
        tasks=["tiny_pubmedqa"],
        task_manager=TaskManager(include_path=str(tmp / "lm_tasks")),
        log_samples=True,
    )
    samples = sorted(out["samples"]["tiny_pubmedqa"], key=lambda s: s["doc_id"])
    theirs = np.array([[resp[0] for resp in s["filtered_resps"]] for s in samples], dtype=float)
    assert theirs.shape == (ours["n"], 3)
    np.testing.assert_allclose(theirs, np.array(ours["loglik"]), rtol=1e-5, atol=1e-5)
    assert out["results"]["tiny_pubmedqa"]["acc,none"] == pytest.approx(ours["accuracy"])


def test_exert_ds_eval_runs_lm_eval_tasks_on_the_same_model(expert_and_tasks):
    expert, tmp = expert_and_tasks
    out = tmp / "both.json"
    args = ["eval", "--model", str(expert), "--task-file", str(tmp / "exert_tasks.yaml"), "--bootstrap", "50"]
    args += ["--lm-eval-tasks", "tiny_pubmedqa", "--lm-eval-include", str(tmp / "lm_tasks"), "--out", str(out)]
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert results["lm_eval"]["results"]["tiny_pubmedqa"]["acc,none"] == pytest.approx(
        results["tasks"]["tiny_pubmedqa"]["accuracy"]
    )
    assert results["model_kind"] == "expert" and results["sparsity"]["check"]["passed"]


def test_lm_eval_tasks_refuse_zero3_in_one_line(tmp_path, capsys):
    args = ["eval", "--model", str(tmp_path), "--lm-eval-tasks", "t", "--deepspeed", "ds.json", "--out", "r.json"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "exert-ds: error: --lm-eval-tasks runs in one process: start exert-ds eval without a launcher or --deepspeed"
    )


def test_lm_eval_cli_with_the_exert_ds_model(expert_and_tasks):
    """lm-eval's own command line (`lm-eval run`), with the `exert_ds` model registered by running this module."""
    import subprocess
    import sys

    from tests.launch import REPO, cpu_env

    expert, tmp = expert_and_tasks
    out = tmp / "lm_eval_out"
    cmd = [sys.executable, "-m", "exert_ds.evaluation.lm_eval_model", "run", "--model", "exert_ds"]
    cmd += ["--model_args", f"expert={expert}", "--tasks", "tiny_pubmedqa", "--include_path", str(tmp / "lm_tasks")]
    cmd += ["--device", "cpu", "--output_path", str(out)]
    env = cpu_env() | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp / "hf_cache")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = out.rglob("results_*.json")
    acc = json.loads(written.read_text())["results"]["tiny_pubmedqa"]["acc,none"]
    assert acc == pytest.approx(exert_ds_scores(expert, tmp)["accuracy"])
