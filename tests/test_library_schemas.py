"""The run YAML's library sections against the libraries' own schemas (issue 21, fault 8): PEFT's LoraConfig, the
arguments of from_pretrained, DeepSpeed's config (its pydantic models, its scalar keys, its optimizers and
schedules) and the output folder. Each fault is one line naming the key or path, before any process group starts,
with nothing written."""

from __future__ import annotations

import json

import pytest

from exert_ds.cli import main
from exert_ds.validation import matches
from tests.fixtures import run_yaml
from tests.launch import REPO, deepspeed_cpu

DS = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())


def ds(**changes) -> dict:
    """The shipped CPU DeepSpeed config with top-level keys replaced."""
    return {**DS, **changes}


CASES = [
    (
        {"lora": {"r": 4, "lora_alpha": "32"}},
        "config key 'lora.lora_alpha' must be int (PEFT's LoraConfig), got str '32'",
    ),
    ({"lora": {"rank": 8}}, "config key 'lora.rank' is not a field of PEFT's LoraConfig; its fields: task_type"),
    ({"lora": {"r": 4, "lora_alhpa": 8}}, "did you mean 'lora.lora_alpha'?"),
    ({"lora": {"r": 4, "lora_dropout": "0.1"}}, "'lora.lora_dropout' must be float"),
    ({"lora": {"r": 4, "use_dora": "yes"}}, "'lora.use_dora' must be bool"),
    ({"lora": {"r": 4, "bias": "some"}}, "'lora.bias' must be Literal['none', 'all', 'lora_only']"),
    ({"lora": {"r": 4, "init_lora_weights": "gauss"}}, "'lora.init_lora_weights' must be"),
    ({"lora": {"r": 4, "target_modules": ["q_proj", 3]}}, "'lora.target_modules' must be"),
    ({"lora": {"r": 4, "task_type": "SEQ_CLS"}}, "PEFT's LoraConfig rejects it"),
    ({"model": {"attn_implementation": "flash"}}, "'model.attn_implementation': 'flash' is not an attention"),
    ({"model": {"revison": "main"}}, "did you mean 'model.revision'"),
    ({"deepspeed": ds(optimizer={"type": "AdamX"})}, "'optimizer.type': 'AdamX' is not an optimizer DeepSpeed knows"),
    ({"deepspeed": ds(optimizer={"type": "SGD", "params": {"lr": 0.1}})}, "set 'zero_allow_untested_optimizer: true'"),
    ({"deepspeed": ds(optimizer={"type": "AdamW", "params": {"lr": "2e-4"}})}, "'optimizer.params.lr' must be float"),
    (
        {"deepspeed": ds(optimizer={"type": "AdamW", "params": {"learning_rate": 1}})},
        "'optimizer.params.learning_rate'",
    ),
    ({"deepspeed": ds(scheduler={"type": "WarmupLRX"})}, "'scheduler.type': 'WarmupLRX' is not a schedule"),
    ({"deepspeed": ds(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": "5"}})}, "warmup_num_steps' must"),
    ({"deepspeed": ds(scheduler={"type": "WarmupDecayLR", "params": {}})}, "lacks total_num_steps"),
    ({"deepspeed": ds(gradient_clipping="1.0")}, "DeepSpeed config key 'gradient_clipping' must be a number"),
    ({"deepspeed": ds(wall_clock_breakdown="no")}, "DeepSpeed config key 'wall_clock_breakdown' must be true or false"),
    (
        {"deepspeed": ds(zero_optimization={"stage": 3, "stage3_max_live_parameters": "lots"})},
        "key 'zero_optimization.stage3_max_live_parameters': Input should be a valid integer",
    ),
    (
        {"deepspeed": ds(zero_optimization={"stage": 3, "offload_optimizer": {"device": "gpu"}})},
        "key 'zero_optimization.offload_optimizer.device': Input should be 'none', 'cpu' or 'nvme'",
    ),
    ({"deepspeed": ds(bf16={"enabled": "maybe"})}, "key 'bf16.enabled': Input should be a valid boolean"),
    ({"deepspeed": 3}, "config key 'deepspeed' must be a path to a DeepSpeed JSON or its mapping, got 3"),
]


@pytest.mark.parametrize("sections,message", CASES)
def test_a_library_section_fault_is_one_line_before_any_work(tmp_path, capsys, sections, message):
    config = run_yaml(tmp_path, **sections)
    capsys.readouterr()  # drop what writing the fixture printed
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exert-ds: error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"[1, 2]", "must hold a JSON object, got list"),
        ('{"optimizer": "caf\xe9"}'.encode("latin-1"), "is not UTF-8 text (byte 18); save it as UTF-8"),
    ],
)
def test_a_deepspeed_file_that_is_not_a_json_object_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "ds.json").write_bytes(content)
    config = run_yaml(tmp_path, deepspeed=str(tmp_path / "ds.json"))
    capsys.readouterr()
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"exert-ds: error: DeepSpeed config {tmp_path / 'ds.json'} {message}"


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_an_unusable_output_folder_is_one_line_before_any_work(tmp_path, capsys, where):
    (tmp_path / "taken").write_text("a file")
    output = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    config = run_yaml(tmp_path, train={"output_dir": str(output)})
    capsys.readouterr()
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"exert-ds: error: config key 'train.output_dir': {output if where == 'file' else ''}")
    assert "\n" not in err and (tmp_path / "taken").read_text() == "a file"


def test_good_sections_pass(tmp_path, capsys):
    """The shipped configs and values of PEFT's own patterns are accepted (no false alarms)."""
    for name in sorted(p.name for p in (REPO / "ds_configs").glob("*.json")):
        config = run_yaml(
            tmp_path,
            deepspeed=str(REPO / "ds_configs" / name),
            lora={"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa_niter_4", "layer_replication": [[0, 2]]},
            model={"attn_implementation": "sdpa"},
        )
        from exert_ds.config import load_config
        from exert_ds.runtime.ds_config import load_ds_config

        load_ds_config(load_config(config).deepspeed, world_size=2)


def test_matches_follows_type_hints():
    from typing import Literal

    assert matches(int, 3) and not matches(int, True) and not matches(int, "3") and matches(float, 3)
    assert matches(list[str] | str | None, None) and not matches(list[str], ["a", 1])
    assert matches(Literal["pissa", "pissa_niter_[n]"], "pissa_niter_16") and not matches(Literal["pissa"], "pis")
    assert matches(tuple[int, int], [0, 2]) and not matches(tuple[int, int], [0])
    assert matches(dict[str, int], {"a": 1}) and not matches(dict[str, int], {"a": "1"})


@pytest.mark.distributed
def test_two_ranks_stop_before_the_process_group(tmp_path):
    """On 2 ranks: the line, no traceback and no gloo error from a peer, nothing written."""
    config = run_yaml(tmp_path, lora={"r": 4, "lora_alpha": "32"})
    proc = deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config)], 2, 300, check=False)
    assert proc.returncode != 0 and "exert-ds: error: config key 'lora.lora_alpha' must be int" in proc.stderr
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr
    assert not (tmp_path / "run").exists()
