"""Bad input gets one line naming the key and the fix, before any process group starts."""

import json
from pathlib import Path

import pytest

from exert_ds.cli import main
from exert_ds.config import load_config, parse_yaml
from exert_ds.errors import ConfigError
from exert_ds.runtime.ds_config import load_ds_config
from exert_ds.storage.checkpoint import FORMAT_VERSION
from tests.fixtures import run_yaml
from tests.launch import deepspeed_cpu

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
def test_shipped_deepspeed_configs_pass_deepspeed_validation(name):
    ds = load_ds_config(str(REPO / "ds_configs" / name), world_size=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2


BAD = [
    ({"prune": {"sparsity": 1.0}}, "'prune.sparsity' must be in [0, 1)"),
    ({"prune": {"sparsity": -0.2}}, "'prune.sparsity' must be in [0, 1)"),
    ({"prune": {"sparsty": 0.5}}, "did you mean 'prune.sparsity'"),
    ({"prune": {"sparsity": "half"}}, "'prune.sparsity' must be float"),
    ({"prune": {"n": 4, "m": 4}}, "need 0 < n < m"),
    ({"prune": {"scorer": "random"}}, "'prune.scorer' must be one of"),
    ({"prune": {"scorer": "sparsegpt"}}, "set 'pbs.mode: off'"),
    ({"pbs": {"mode": "fast"}}, "'pbs.mode' must be one of"),
    (
        {"lora": {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]}},
        "lacks ['down_proj']",
    ),
    ({"deepspeed": {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}}, "set it to 3"),
    (
        {"deepspeed": {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 7, "zero_optimization": {"stage": 3}}},
        "train_batch_size 7 != train_micro_batch_size_per_gpu 2",
    ),
    ({"model": {"name_or_path": "./no_such_model_dir"}}, "does not exist"),
    ({"train": {"epochs": 0}}, "'train.epochs' must be > 0"),
    ({"trian": {}}, "did you mean 'train'"),
    ({"modle": {}}, "did you mean 'model'"),
    ({"model": {"name_or_path": ""}}, "'model.name_or_path' is required"),
    ({"model": {"dtype": "float8"}}, "'model.dtype' must be one of"),
    ({"model": {"init": "zeros"}}, "'model.init' must be 'pretrained' or 'random'"),
    ({"prune": {"ramp": "linear"}}, "'prune.ramp' must be 'none' or 'cubic'"),
    ({"prune": {"ema_eta": 0.0}}, "'prune.ema_eta' must be in (0, 1]"),
    ({"prune": {"ema_dtype": "float16"}}, "'prune.ema_dtype' must be 'float32' or 'bfloat16', got 'float16'"),
    ({"prune": {"every_steps": 0}}, "'prune.every_steps' must be > 0"),
    ({"prune": {"every_steps": "often"}}, "'prune.every_steps' must be int, got str 'often'"),  # int | None
    ({"prune": {"start_step": -1}}, "'prune.start_step' must be >= 0"),
    ({"prune": {"recovery_steps": -3}}, "'prune.recovery_steps' must be >= 0"),
    ({"prune": {"enabled": False, "recovery_steps": 4}}, "'prune.recovery_steps' recovers after the final mask"),
    ({"prune": {"recovery_steps": 4}, "lora": {"r": 4, "use_dora": True}}, "masks plain LoRA's product B·A only"),
    ({"prune": {"recovery_steps": 4}, "lora": {"r": 4, "lora_bias": True}}, "masks plain LoRA's product B·A only"),
    ({"prune": {"allocation": "owl", "n": 2, "m": 4}}, "'prune.allocation: owl' varies the sparsity over blocks"),
    ({"prune": {"allocation": "owl", "sparsity": 0.2, "owl_lambda": 0.3}}, "'prune.owl_lambda' (0.3) must keep every"),
    ({"prune": {"allocation": "owl", "enabled": False}}, "'prune.allocation: owl' spreads the pruning over blocks"),
    ({"prune": {"owl_threshold": 0}}, "'prune.owl_threshold' must be > 0"),
    ({"prune": {"enabled": "yes"}}, "'prune.enabled' must be bool"),
    ({"pbs": {"reg": -1.0}}, "'pbs.reg' must be >= 0"),
    ({"pbs": {"keep_weight": 2.0}}, "'pbs.keep_weight' must be in [0, 1]"),
    ({"pbs": {"matmul_precision": "medium"}}, "'pbs.matmul_precision' must be 'highest' or 'high', got 'medium'"),
    ({"lora": {"r": 0}}, "'lora.r' must be a positive int"),
    ({"calibration": {"num_samples": 0}}, "'calibration.num_samples' must be > 0"),
    ({"calibration": {"seq_len": -5}}, "'calibration.seq_len' must be > 0"),
    ({"data": {"seq_len": 0}}, "'data.seq_len' must be > 0"),
    ({"data": {"train": []}}, "'data.train' needs at least one source"),
    ({"data": {"train": [{"path": "./missing.jsonl"}]}}, "'data.train[0].path': ./missing.jsonl does not exist"),
    ({"data": {"train": [{"pth": "x.jsonl"}]}}, "did you mean 'data.train[0].path'"),
    ({"data": {"train": "health.jsonl"}}, "'data.train' must be a list"),
    ({"train": {"reset_after_prune": "all"}}, "'train.reset_after_prune' must be one of 'none', 'zero', 'keep_v'"),
    ({"train": {"max_steps": 0}}, "'train.max_steps' must be > 0"),
    ({"train": {"save_every_steps": 0}}, "'train.save_every_steps' must be > 0"),
    ({"train": {"keep_checkpoints": 0}}, "'train.keep_checkpoints' must be > 0"),
    ({"train": {"output_dir": ["a", "b"]}}, "'train.output_dir' must be str"),
    ({"eval": {"window": 0}}, "'eval.window' must be > 0"),
    (
        {"eval": {"perplexity": [{"path": "./held_out.jsonl"}]}},
        "'eval.perplexity[0].path': ./held_out.jsonl does not exist",
    ),
    ({"deepspeed": "./no_ds.json"}, "'deepspeed': ./no_ds.json does not exist"),
    (
        {"deepspeed": {"train_micro_batch_size_per_gpu": 0, "zero_optimization": {"stage": 3}}},
        "train_micro_batch_size_per_gpu must be a positive integer",
    ),
    (
        {
            "deepspeed": {
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 3},
                "bf16": {"enabled": "maybe"},
            }
        },
        "DeepSpeed rejected the config",
    ),
]


@pytest.mark.parametrize("sections,message", BAD)
def test_bad_config_one_line(tmp_path, capsys, sections, message):
    config = run_yaml(tmp_path, **sections)
    capsys.readouterr()  # drop what writing the fixture printed
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exert-ds: error:") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_catalogue_is_large_enough():
    assert len(BAD) >= 30


def test_invalid_yaml(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("model: {name_or_path: x\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def test_missing_config_file(capsys):
    assert main(["train", "--config", "/no/such/run.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_overrides_are_typed(tmp_path):
    cfg = load_config(run_yaml(tmp_path), {"prune.sparsity": 0.4, "train.max_steps": 3})
    assert cfg.prune.sparsity == 0.4 and cfg.train.max_steps == 3
    with pytest.raises(ConfigError, match="did you mean 'prune.sparsity'"):
        load_config(run_yaml(tmp_path), {"prune.sparsit": 0.4})


@pytest.mark.distributed
@pytest.mark.parametrize(
    "sections,message",
    [
        ({"calibration": {"num_samples": 400, "seq_len": 16}}, "calibration needs 400 sequences"),
        ({"prune": {"n": 2, "m": 4}}, "M=4 does not divide"),
    ],
)
def test_runtime_bad_input_same_error_on_both_ranks(tmp_path, sections, message):
    """Errors found after the process group starts: both ranks print the same line and exit, no hang."""
    config = run_yaml(tmp_path, **sections)
    with pytest.raises(AssertionError) as failed:
        deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config)], ranks=2, timeout=300)
    output = str(failed.value)
    assert output.count(message) >= 2, output[-2000:]


def test_off_in_yaml_and_set_is_the_string_off(tmp_path):
    """YAML 1.1 reads `off` as False; the run YAML and --set use YAML 1.2 booleans so `pbs.mode: off` works."""
    config = run_yaml(tmp_path, prune={"scorer": "wanda"})
    config.write_text(config.read_text() + "pbs: {mode: off}\n")
    assert load_config(config).pbs.mode == "off"
    assert load_config(run_yaml(tmp_path), {"pbs.mode": parse_yaml("off")}).pbs.mode == "off"
    assert parse_yaml("true") is True and parse_yaml("no") == "no"


def test_resume_from_another_run_is_refused_before_any_work(tmp_path, capsys):
    """A checkpoint whose manifest has another config fingerprint (or no manifest) stops `train --resume` with one
    line before the process group starts; nothing is written."""
    config = run_yaml(tmp_path)
    checkpoint = tmp_path / "elsewhere" / "step-00000001-event-000"
    checkpoint.mkdir(parents=True)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--resume", str(checkpoint)]) == 2
    assert "no manifest.json in" in capsys.readouterr().err
    manifest = {"format": FORMAT_VERSION, "config_fingerprint": "another run", "world_size": 1, "micro_batch": 1}
    manifest |= {"train_batch_size": 1, "position": {}, "params": {}, "trainable": {}, "files": {}}  # complete
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", "--config", str(config), "--resume", str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was written by another run (config differs)" in err, err
    assert not out.exists()
