"""train.save_event_experts and `exert-ds eval --adapter` (issue 20.3: evaluate an expert after each event and before
each merge, to find the step that loses a skill). On 2 ranks: the expert written after the final event holds exactly
the final expert's tensors; the first event's expert keeps ⌊p·in⌋ zeros per row; event 0's expert evaluated with
event 1's adapter (`--adapter`) scores as the same weights merged by hand (W + (α/r)·B·A) and saved as a Hugging
Face directory, on 1 process and on 2 ranks alike."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from exert_ds.cli import main
from exert_ds.storage.expert import expert_tensors
from tests.fixtures import run_yaml
from tests.launch import deepspeed_cpu
from tests.test_checkpoint import train_args

pytestmark = pytest.mark.distributed


def merged_by_hand(expert: dict[str, torch.Tensor], adapter_dir) -> dict[str, torch.Tensor]:
    """The expert's tensors with every LoRA pair of the PEFT directory added as W + (lora_alpha / r)·B·A."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    lora = load_file(adapter_dir / "adapter_model.safetensors")
    out = dict(expert)
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        target = key.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
        out[target] = expert[target] + scale * (b @ a).to(expert[target].dtype)
    return out


def test_event_experts_and_eval_with_the_next_events_adapter(tmp_path):
    config = run_yaml(
        tmp_path,
        lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        prune={"sparsity": 0.5, "every_steps": 2},
        train={"max_steps": 4, "save_event_experts": True, "save_event_adapters": True},
    )
    out = deepspeed_cpu(train_args(config), ranks=2).stdout
    run = tmp_path / "run"
    assert f"wrote {run / 'event_experts' / 'event-1'} (the model after prune event 1)" in out
    final = dict(expert_tensors(run / "expert"))
    after_last = dict(expert_tensors(run / "event_experts" / "event-1"))
    assert final.keys() == after_last.keys() and all(torch.equal(final[k], after_last[k]) for k in final)
    first = dict(expert_tensors(run / "event_experts" / "event-0"))  # reading checks the promise too
    pruned = [k for k in first if k.endswith("proj.weight")]
    assert len(pruned) == 14
    for name in pruned:
        w = first[name]
        assert ((w == 0).sum(1) == math.floor(0.5 * w.shape[1])).all(), name
        assert not torch.equal(w, final[name]), name
    # the model event 1 started from: event 0's expert + the adapter event 1 merged
    reference = tmp_path / "before_event_1"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    model.load_state_dict(merged_by_hand(first, run / "event_adapters" / "event-1"))
    model.save_pretrained(reference)
    AutoTokenizer.from_pretrained(tmp_path / "model").save_pretrained(reference)
    text = f"health={tmp_path / 'health.jsonl'}"
    flags = ["--perplexity", text, "--window", "16", "--micro-batch", "2"]
    assert main(["eval", "--model", str(reference), "--out", str(tmp_path / "ref.json"), *flags]) == 0
    adapter = ["--adapter", str(run / "event_adapters" / "event-1")]
    got_args = [
        "eval",
        "--model",
        str(run / "event_experts" / "event-0"),
        *adapter,
        "--out",
        str(tmp_path / "got.json"),
    ]
    assert main([*got_args, *flags]) == 0
    want, got = (json.loads((tmp_path / name).read_text()) for name in ("ref.json", "got.json"))
    assert got["adapter"] == adapter[1] and "check" not in got["sparsity"]  # merged dense: no promise checked
    assert got["perplexity"]["health"]["perplexity"] == pytest.approx(
        want["perplexity"]["health"]["perplexity"], rel=1e-5
    )
    # 2 ranks, each merging the adapter into its own copy and scoring its share of the windows: the same perplexity
    two = [*got_args[:-1], str(tmp_path / "two.json"), *flags]
    deepspeed_cpu(["--module", "exert_ds", *two], ranks=2)
    on_two = json.loads((tmp_path / "two.json").read_text())
    assert on_two["world_size"] == 2
    assert on_two["perplexity"]["health"]["perplexity"] == pytest.approx(
        got["perplexity"]["health"]["perplexity"], rel=1e-6
    )
    plain = tmp_path / "plain.json"
    assert main(["eval", "--model", str(run / "event_experts" / "event-0"), "--out", str(plain), *flags]) == 0
    assert json.loads(plain.read_text())["perplexity"] != got["perplexity"]  # the adapter did change the model


def test_adapter_flag_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    base = ["eval", "--model", str(tmp_path), "--perplexity", "medquad_answers", "--out", str(tmp_path / "r.json")]
    cases = [
        (["--adapter", str(tmp_path / "absent")], f"--adapter {tmp_path / 'absent'} does not exist"),
        (["--adapter", str(tmp_path / "empty")], "not a PEFT adapter directory (no adapter_config.json)"),
        (["--adapter", str(tmp_path / "empty"), "--deepspeed", "x.json"], "drop --deepspeed"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("exert-ds: error:") and message in err and "\n" not in err
    assert not (tmp_path / "r.json").exists()
