"""On-disk fixtures for end-to-end runs: a tiny tokenizer and model saved as HF directories, and JSONL text."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.tiny_models import tiny_model

WORDS = (
    "patient fever cough asthma insulin diabetes heart lung kidney liver blood pressure dose tablet "
    "symptom chronic acute therapy infection virus bacteria vaccine clinical trial study result"
).split()


def health_sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + "." for _ in range(count)]


def save_tokenizer(out: Path, words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (offline, deterministic) saved as an HF directory."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, ".": 3, **{w: i + 4 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.save_pretrained(out)
    return tokenizer


def save_tiny_model_dir(out: Path, family: str = "llama-odd", layers: int = 2) -> Path:
    """A tiny random model + tokenizer in one HF directory (what `model.name_or_path` points at)."""
    tokenizer = save_tokenizer(out)
    model = tiny_model(family, layers=layers, vocab=len(tokenizer))
    model.save_pretrained(out)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_yaml(tmp: Path, **sections) -> Path:
    """A run YAML over the tiny model and tiny health text in `tmp`; `sections` override top-level keys."""
    import yaml

    model_dir = save_tiny_model_dir(tmp / "model")
    text = write_jsonl(tmp / "health.jsonl", [{"text": s} for s in health_sentences(120)])
    cfg = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32", "attn_implementation": "eager"},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "deepspeed": str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero3_cpu.json"),
        "data": {"train": [{"path": str(text)}], "seq_len": 16},
        "calibration": {"num_samples": 8, "seq_len": 16, "micro_batch": 4},
        "prune": {"sparsity": 0.5},
        "train": {"epochs": 2, "output_dir": str(tmp / "run"), "log_every": 1},
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and isinstance(cfg.get(key), dict)
        cfg[key] = {**cfg[key], **value} if merge else value
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


READ_ONLY = r"(Read-only file system \(EROFS\)|Permission denied \(EACCES\))"  # what a read-only folder says


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "1400k", read_only: bool = False) -> Iterator[Path]:
    """`folder` as a tmpfs of `size` (read-only if asked) while inside. Where mounting is refused (not root), a
    read-only folder is a folder without write permission (EACCES instead of EROFS); a small one skips the test."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mount.returncode:
        if not read_only or os.geteuid() == 0:
            pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
