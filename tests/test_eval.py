"""`exert-ds eval`: every task end to end on a tiny model and generated data, label scores against a direct
per-sequence computation, a known-answer model, metrics and bootstrap, the sparsity report and promise check,
bad input as one line, and 2 ZeRO-3 ranks against one process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exert_ds.cli import main
from exert_ds.evaluation.evaluate import EvalSettings, task_result
from exert_ds.evaluation.metrics import bootstrap_ci, classification_report, macro_f1
from exert_ds.evaluation.scoring import build_sequences, label_loglikelihoods
from exert_ds.evaluation.sparsity import check_promise, sparsity_report
from exert_ds.evaluation.tasks import TASKS, licensedcode_records, load_task
from exert_ds.storage.expert import write_expert
from tests.eval_data import prune_rows_by_magnitude, save_eval_model_dir, write_task_data
from tests.fixtures import READ_ONLY, small_tmpfs
from tests.launch import deepspeed_cpu

ALL_TASKS = "pubmedqa,cuad,medquad_qtype,license_category"


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    return save_eval_model_dir(tmp_path / "model"), write_task_data(tmp_path / "data")


def eval_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--model",
        str(model),
        "--tasks",
        ALL_TASKS,
        "--data-dir",
        str(data),
        "--task-data",
        f"license_category={data / 'licenses'}",
        "--perplexity",
        f"general={data / 'general.jsonl'}",
        "--perplexity",
        "medquad_answers",
        "--window",
        "16",
        "--micro-batch",
        "3",
        "--bootstrap",
        "200",
        "--save-scores",
        "--out",
        str(out),
        *extra,
    ]


def direct_loglik(model, tokenizer, prompt: str, label: str, max_length: int) -> float:
    """Sum of log p(label tokens | prompt) from one unpadded forward of the one sequence."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    label_ids = tokenizer(label, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([(prompt_ids + label_ids)[-max_length:]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    n = len(label_ids)
    return float(sum(logp[ids.shape[1] - n - 1 + j, label_ids[j]] for j in range(n)))


def test_every_task_end_to_end_matches_direct_scores(setup, tmp_path):
    model_dir, data = setup
    out = tmp_path / "results.json"
    assert main(eval_args(model_dir, data, out, "--max-length", "24")) == 0
    results = json.loads(out.read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for name in ALL_TASKS.split(","):
        override = str(data / "licenses") if name == "license_category" else None
        examples = load_task(TASKS[name], data, override)
        got = results["tasks"][name]
        assert got["n"] == len(examples.gold) > 0
        want = np.array(
            [[direct_loglik(model, tokenizer, p, v, 24) for v in examples.verbalisations] for p in examples.prompts]
        )
        np.testing.assert_allclose(np.array(got["loglik"]), want, rtol=1e-4, atol=1e-4)
        pred = [examples.labels[i] for i in want.argmax(1)]
        assert got["predictions"] == pred
        assert got["gold"] == list(examples.gold)
        assert got["accuracy"] == pytest.approx(np.mean(np.array(pred) == np.array(examples.gold)))
        assert got["ci95"]["accuracy"][0] <= got["accuracy"] <= got["ci95"]["accuracy"][1]
    assert results["tasks"]["medquad_qtype"]["labels"] == ["genetic changes", "information", "symptoms", "treatment"]
    assert set(results["perplexity"]) == {"general", "medquad_answers"}
    assert results["perplexity"]["medquad_answers"]["domain"] == "health"
    assert results["sparsity"]["overall"] == 0.0 and len(results["sparsity"]["blocks"]) == 2
    assert results["world_size"] == 1 and results["zero3"] is False and results["versions"]["torch"]


def test_a_model_forced_to_one_label_scores_that_labels_share(setup):
    """lm_head replaced by zero weights + a bias on the token of ' no': every prediction is 'no', so accuracy is
    exactly the share of gold 'no' and the majority baseline is untouched."""
    model_dir, data = setup
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids("no")] = 5.0
    model.lm_head = head
    examples = load_task(TASKS["pubmedqa"], data)
    sequences = build_sequences(tokenizer, examples.prompts, examples.verbalisations, 64)
    loglik = label_loglikelihoods(model, sequences, 4, tokenizer.pad_token_id)
    result = task_result(examples, loglik, EvalSettings(model="", tasks=[], out=""))
    share = examples.gold.count("no") / len(examples.gold)
    assert 0 < share < 1
    assert result["accuracy"] == share
    assert result["pred_counts"] == {"no": len(examples.gold)}


def test_simulated_ranks_score_bit_identically_with_equal_forward_counts(setup):
    """3 ranks over 8 batches (shares 3, 3, 2), gathered, equal the 1-process scores bit for bit, and every rank
    makes the same number of forward calls (ZeRO-3 needs it) by repeating a batch it then drops."""
    model_dir, data = setup
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_task(TASKS["pubmedqa"], data)
    sequences = build_sequences(tokenizer, examples.prompts, examples.verbalisations, 32)
    assert -(-len(sequences.ids) // 5) == 8  # 36 sequences: 8 batches of up to 5
    want = label_loglikelihoods(model, sequences, 5, tokenizer.pad_token_id)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    parts = []
    for rank in range(3):
        calls.clear()
        label_loglikelihoods(
            model, sequences, 5, tokenizer.pad_token_id, rank, 3, gather=lambda o: parts.append(o) or [o]
        )
        assert len(calls) == 3
    got = label_loglikelihoods(model, sequences, 5, tokenizer.pad_token_id, 0, 3, gather=lambda o: parts)
    assert sorted(b for part in parts for b in part) == list(range(8))
    np.testing.assert_array_equal(got, want)


def test_metrics_against_hand_computed_values():
    gold = np.array(["a", "a", "b", "c"])
    pred = np.array(["a", "b", "b", "b"])
    # a: tp1 fp0 fn1 → 2/3; b: tp1 fp2 fn0 → 1/2; c: tp0 fp0 fn1 → 0
    assert macro_f1(gold, pred) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    report = classification_report(list(gold), list(pred), resamples=100)
    assert report["accuracy"] == 0.5 and report["majority_label"] == "a" and report["majority_accuracy"] == 0.5


def test_bootstrap_interval_contains_the_accuracy_and_is_deterministic():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 3, 200).astype(str)
    pred = np.where(rng.random(200) < 0.7, gold, "0")
    acc = float(np.mean(gold == pred))
    first, again, other = (
        bootstrap_ci(gold, pred, seed=0),
        bootstrap_ci(gold, pred, seed=0),
        bootstrap_ci(gold, pred, seed=1),
    )
    assert first == again and first != other
    low, high = first["accuracy"]
    assert low < acc < high and high - low < 0.2


def test_subsample_is_seeded_and_in_file_order(setup):
    _, data = setup
    whole = load_task(TASKS["cuad"], data)
    part = load_task(TASKS["cuad"], data, max_examples=5, seed=3)
    assert part.prompts == load_task(TASKS["cuad"], data, max_examples=5, seed=3).prompts
    positions = [whole.prompts.index(p) for p in part.prompts]
    assert len(part.prompts) == 5 and positions == sorted(positions)


def test_licence_files_parse_like_licensedcode_data(tmp_path):
    folder = tmp_path / "lic"
    folder.mkdir()
    (folder / "mit.LICENSE").write_text(
        "---\nkey: mit\nname: MIT License\ncategory: Permissive\n---\n\nPermission is hereby granted\n"
    )
    (folder / "empty.LICENSE").write_text("---\nkey: empty\ncategory: Permissive\n---\n")
    assert licensedcode_records(folder) == [
        {"key": "mit", "category": "Permissive", "text": "Permission is hereby granted", "split": "test"}
    ]


def test_sparsity_report_and_promise(setup, tmp_path):
    """Half of every row of every projection zeroed (smallest magnitudes): the report reads 0.5 per matrix,
    the promise 0.5 passes and 0.6 fails with exit status 1 (results still written)."""
    model_dir, data = setup
    model = prune_rows_by_magnitude(AutoModelForCausalLM.from_pretrained(model_dir))
    pruned = tmp_path / "pruned"
    model.save_pretrained(pruned)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(pruned)
    report = sparsity_report(model)
    for roles in report["blocks"]:
        for role, value in roles.items():
            width = report["in_features"][role]
            assert value == (width // 2) / width
    assert check_promise(report, 0.5)["passed"] and not check_promise(report, 0.6)["passed"]
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(pruned), "--tasks", "cuad", "--data-dir", str(data), "--out", str(out)]
    assert main([*args, "--expect-sparsity", "0.5"]) == 0
    saved = json.loads(out.read_text())["sparsity"]
    assert saved["check"]["passed"] and saved["blocks"] == report["blocks"]
    assert main([*args, "--expect-sparsity", "0.6"]) == 1
    assert not json.loads(out.read_text())["sparsity"]["check"]["passed"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "pubmedq"], "unknown task 'pubmedq'; did you mean 'pubmedqa'?"),
        (
            ["--tasks", "pubmedqa", "--task-data", "pubmedqa=/nonexistent/p.jsonl"],
            "data file /nonexistent/p.jsonl does not exist",
        ),
        (["--tasks", "pubmedqa", "--model", "/nonexistent/model"], "--model /nonexistent/model does not exist"),
        (["--tasks", "cuad", "--data-dir", "/nonexistent"], "--data-dir /nonexistent is not a directory"),
        (["--tasks", "cuad", "--perplexity", "wiki"], "--perplexity 'wiki': not a preset"),
    ],
)
def test_bad_input_is_one_line(setup, tmp_path, capsys, extra, message):
    model_dir, data = setup
    args = ["eval", "--model", str(model_dir), "--data-dir", str(data), "--out", str(tmp_path / "r.json"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exert-ds: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "r.json").exists()


def pruned_model_and_expert(model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The tiny model with half of every row pruned, saved both as an HF directory and as a sparse expert."""
    model = prune_rows_by_magnitude(AutoModelForCausalLM.from_pretrained(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_dir = tmp_path / "pruned"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return hf_dir, write_expert(model, tokenizer, tmp_path / "expert", sparsity=0.5)


def test_expert_directory_scores_like_its_hf_export(setup, tmp_path):
    """The sparse expert read tensor by tensor gives the same scores as the same weights saved as HF, and its
    manifest's promise (0.5) is checked without --expect-sparsity."""
    model_dir, data = setup
    hf_dir, expert_dir = pruned_model_and_expert(model_dir, tmp_path)
    a, b = tmp_path / "hf.json", tmp_path / "expert.json"
    assert main(eval_args(hf_dir, data, a)) == 0
    assert main(eval_args(expert_dir, data, b)) == 0
    hf, expert = json.loads(a.read_text()), json.loads(b.read_text())
    assert (hf["model_kind"], expert["model_kind"]) == ("hf", "expert")
    for name, want in hf["tasks"].items():
        assert expert["tasks"][name]["loglik"] == want["loglik"]
    assert expert["perplexity"] == hf["perplexity"]
    assert expert["sparsity"]["check"]["promised"] == 0.5 and expert["sparsity"]["check"]["passed"]
    assert "check" not in hf["sparsity"] and expert["sparsity"]["blocks"] == hf["sparsity"]["blocks"]


def test_damaged_expert_is_one_line(setup, tmp_path, capsys):
    model_dir, data = setup
    _, expert_dir = pruned_model_and_expert(model_dir, tmp_path)
    shard = next(expert_dir.glob("expert-rank*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8])
    args = [
        "eval",
        "--model",
        str(expert_dir),
        "--tasks",
        "cuad",
        "--data-dir",
        str(data),
        "--out",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "exert-ds: error: " in line]
    assert len(errors) == 1 and errors[0].endswith("the expert is damaged, write it again") and shard.name in errors[0]


@pytest.mark.parametrize("damage", ["config.json", "expert_manifest.json"])
def test_expert_missing_config_or_damaged_manifest_is_exports_one_line(setup, tmp_path, capsys, damage):
    """Issue 21.9: an expert without config.json, or with a truncated manifest: `eval`, `export` and `inspect`
    stop with the same one line naming the file."""
    model_dir, data = setup
    _, expert_dir = pruned_model_and_expert(model_dir, tmp_path)
    file = expert_dir / damage
    if damage == "config.json":
        file.unlink()
    else:
        file.write_text(file.read_text()[:100])
    capsys.readouterr()
    lines = []
    for args in (
        ["export", "--ckpt", str(expert_dir), "--out", str(tmp_path / "hf")],
        ["eval", "--model", str(expert_dir), "--tasks", "cuad", "--data-dir", str(data), "--out", str(tmp_path / "r")],
        ["inspect", str(expert_dir)],
    ):
        assert main(args) in (1, 2)
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("exert-ds: error: ")]
        assert len(errors) == 1 and str(file) in errors[0], errors
        lines.append(errors[0])
    assert lines[0] == lines[1] == lines[2] and "damaged" in lines[0]
    assert not (tmp_path / "hf").exists() and not (tmp_path / "r").exists()


def test_results_on_a_read_only_file_system_are_one_line(setup, tmp_path, capsys):
    model_dir, data = setup
    with small_tmpfs(tmp_path / "ro", read_only=True) as ro:
        assert main(eval_args(model_dir, data, ro / "r.json")) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.match(rf"exert-ds: error: cannot write {ro / 'r.json'}: {READ_ONLY}", err), err


@pytest.mark.distributed
def test_two_zero3_ranks_on_the_expert_equal_one_process(setup, tmp_path):
    """2 ranks, ZeRO-3 inference, the sparse expert loaded into partitions tensor by tensor, against one process
    on the same weights as an HF directory: identical metrics and predictions."""
    model_dir, data = setup
    hf_dir, expert_dir = pruned_model_and_expert(model_dir, tmp_path)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(eval_args(hf_dir, data, one)) == 0
    ds = str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero3_cpu.json")
    deepspeed_cpu(["--module", "exert_ds", *eval_args(expert_dir, data, two, "--deepspeed", ds)], ranks=2)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (b["world_size"], b["zero3"], b["model_kind"]) == (2, True, "expert")
    for name, want in a["tasks"].items():
        got = b["tasks"][name]
        for key in ("n", "accuracy", "macro_f1", "ci95", "majority_accuracy", "predictions"):
            assert got[key] == want[key], (name, key)
        np.testing.assert_allclose(got["loglik"], want["loglik"], rtol=1e-6)
    for name, want in a["perplexity"].items():
        assert b["perplexity"][name]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
        assert b["perplexity"][name]["tokens"] == want["tokens"]
    assert b["sparsity"]["blocks"] == a["sparsity"]["blocks"] and b["sparsity"]["check"]["passed"]
