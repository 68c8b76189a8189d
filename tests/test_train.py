"""`exert-ds train` and `exert-ds prune` end to end under the deepspeed launcher on 2 CPU ranks."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from exert_ds.roles import LLAMA_LIKE_ROLES
from tests.fixtures import run_yaml
from tests.launch import REPO, deepspeed_cpu, torchrun_cpu

pytestmark = pytest.mark.distributed


def pruned_matrices(state: dict) -> dict:
    suffixes = tuple(f"{path}.weight" for path in LLAMA_LIKE_ROLES.values())
    return {k: v for k, v in state.items() if k.endswith(suffixes)}


def loss_lines(output: str) -> list[str]:
    return [line.split("step ", 1)[1].split(", lr")[0] for line in output.splitlines() if "loss " in line]


def test_torchrun_gives_the_same_losses_as_the_deepspeed_launcher(tmp_path):
    config = run_yaml(tmp_path, prune={"sparsity": 0.5, "every_steps": 2}, train={"max_steps": 4})
    by_torchrun = torchrun_cpu(["-m", "exert_ds", "train", "--config", str(config)], ranks=2)
    by_deepspeed = deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config)], ranks=2)
    assert len(loss_lines(by_torchrun.stdout)) == 4
    assert loss_lines(by_torchrun.stdout) == loss_lines(by_deepspeed.stdout)


def test_train_two_events_reaches_exact_sparsity(tmp_path):
    config = run_yaml(
        tmp_path,
        prune={"sparsity": 0.5, "every_steps": 3},
        train={"max_steps": 7},
        eval={"perplexity": [{"path": str(tmp_path / "health.jsonl")}], "window": 16, "max_windows": 5},
    )
    proc = deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config)], ranks=2)
    losses = [
        float(line.split("loss ")[1].split(",")[0])
        for line in proc.stdout.splitlines()
        if "step " in line and "loss" in line
    ]
    assert len(losses) == 7 and all(math.isfinite(x) for x in losses)
    assert proc.stdout.count("prune event") >= 3  # before steps 3 and 6, and the final one
    final = tmp_path / "run" / "final"
    matrices = pruned_matrices(load_file(final / "model.safetensors"))
    assert len(matrices) == 14
    for name, w in matrices.items():
        assert ((w == 0).sum(1) == math.floor(0.5 * w.shape[1])).all(), name
    model = AutoModelForCausalLM.from_pretrained(final)  # stock loading of what we wrote
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits).all()
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    widths = {"q": 45, "k": 45, "v": 45, "o": 36, "gate": 45, "up": 45, "down": 47}  # in_features of llama-odd
    for role, width in widths.items():
        assert summary["measured_sparsity"][role] == pytest.approx(math.floor(0.5 * width) / width), role
    assert math.isfinite(summary["dense_perplexity"]) and math.isfinite(summary["sparse_perplexity"])


def test_a_failed_export_at_the_end_reaches_every_rank(tmp_path):
    config = run_yaml(tmp_path, prune={"sparsity": 0.5, "every_steps": 2}, train={"max_steps": 2})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final").write_text("in the way")  # rank 0 exports into run/final: it cannot
    worker = str(REPO / "tests" / "workers" / "finish_failure.py")
    deepspeed_cpu([worker, "--config", str(config), "--out", str(tmp_path)], ranks=2)  # both ranks return: no hang
    errors = [(tmp_path / f"error-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert errors[0] == errors[1] and errors[0].startswith("ConfigError: ") and "is not a directory" in errors[0]
    assert f"exert-ds export --ckpt {tmp_path / 'run' / 'expert'}" in errors[0]
    assert (tmp_path / "run" / "expert").is_dir() and (tmp_path / "run" / "final").read_text() == "in the way"
    (tmp_path / "one").mkdir()
    deepspeed_cpu([worker, "--config", str(config), "--out", str(tmp_path / "one")], ranks=1)
    assert (tmp_path / "one" / "error-rank0.txt").read_text() == errors[0]  # the 1-rank run fails the same way


def test_prune_one_shot_wanda(tmp_path):
    config = run_yaml(tmp_path, prune={"scorer": "wanda", "sparsity": 0.4}, pbs={"mode": "off"})
    deepspeed_cpu(["--module", "exert_ds", "prune", "--config", str(config)], ranks=2)
    for name, w in pruned_matrices(load_file(tmp_path / "run" / "final" / "model.safetensors")).items():
        assert ((w == 0).sum(1) == math.floor(0.4 * w.shape[1])).all(), name


def test_prune_with_trained_adapter_equals_one_process(tmp_path):
    """`exert-ds prune --adapter DIR` on 2 ranks = the 1-process event on the same model with that adapter."""
    from exert_ds.prune.event import run_prune_event
    from exert_ds.runtime.access import DenseBackend
    from tests.tiny_models import event_config, tiny_lora_model

    config = run_yaml(tmp_path, prune={"scorer": "foresight", "sparsity": 0.5})
    vocab = AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.vocab_size
    adapted = tiny_lora_model("llama-odd", vocab=vocab, r=4, seed=0)  # same base weights as the saved model
    adapted.save_pretrained(tmp_path / "adapter")
    deepspeed_cpu(
        ["--module", "exert_ds", "prune", "--config", str(config), "--adapter", str(tmp_path / "adapter")], ranks=2
    )
    got = pruned_matrices(load_file(tmp_path / "run" / "final" / "model.safetensors"))
    # the same event in one process, on the same calibration windows the run used
    from exert_ds.config import load_config
    from exert_ds.data import calibration_batch
    from exert_ds.model.loading import load_tokenizer

    cfg = load_config(config)
    ids = calibration_batch(cfg.calibration_sources(), load_tokenizer(cfg.model), 8, 16, cfg.train.seed)
    run_prune_event(adapted, DenseBackend(), event_config(sparsity=0.5, micro_batch=4), ids)
    want = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in adapted.state_dict().items()}
    for name, w in got.items():
        assert torch.equal(w != 0, want[name] != 0), name
        assert float((w - want[name]).norm() / want[name].norm()) <= 1e-5, name


def test_adapter_loads_into_zero3_partitioned_lora_on_two_ranks_as_on_one(tmp_path):
    """trainer.load_adapter_weights (PEFT's set_peft_model_state_dict) on LoRA already partitioned by ZeRO-3: the
    gathered LoRA equals the adapter file on 2 ranks and on 1; an adapter of another rank r stops both ranks with
    the same one line."""
    from peft.utils import load_peft_weights

    from tests.tiny_models import tiny_lora_model

    tiny_lora_model("llama-odd", r=4, seed=1).save_pretrained(tmp_path / "adapter")
    tiny_lora_model("llama-odd", r=8, seed=1).save_pretrained(tmp_path / "wide")
    saved = load_peft_weights(str(tmp_path / "adapter"))
    worker = str(REPO / "tests" / "workers" / "adapter_load.py")
    got = {}
    for ranks in (1, 2):
        out = tmp_path / f"lora{ranks}.pt"
        deepspeed_cpu([worker, "--adapter", str(tmp_path / "adapter"), "--out", str(out)], ranks=ranks)
        got[ranks] = torch.load(out)
    assert len(got[2]) == len(saved) == 2 * 7 * 2
    for name, value in got[2].items():
        key = name.replace(".default.weight", ".weight")
        assert torch.equal(value, saved[key]), name
        assert torch.equal(value, got[1][name]), name
    out = tmp_path / "wide.pt"
    deepspeed_cpu([worker, "--adapter", str(tmp_path / "wide"), "--out", str(out)], ranks=2)
    errors = [out.with_suffix(f".rank{r}.txt").read_text() for r in (0, 1)]
    assert errors[0] == errors[1] and "does not match this model's LoRA" in errors[0] and "\n" not in errors[0]
