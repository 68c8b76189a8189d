"""Tiny generated data in the format of every evaluation task (shared/data/README.md, licensedcode-data's
.LICENSE files), and a tiny model whose tokenizer knows the label words, for the `exert-ds eval` tests."""

from __future__ import annotations

import random
from pathlib import Path

from tests.fixtures import WORDS, save_tokenizer, write_jsonl
from tests.tiny_models import tiny_model

LABEL_WORDS = "yes no maybe Yes No information symptoms treatment genetic changes Permissive Copyleft".split()
PROMPT_WORDS = "Context Question Answer or Clause Is this a clause type License text category".split()


def save_eval_model_dir(out: Path, family: str = "llama-odd", seed: int = 0) -> Path:
    """A tiny random model + a word-level tokenizer over the test words, label words and prompt words."""
    tokenizer = save_tokenizer(out, list(dict.fromkeys([*WORDS, *LABEL_WORDS, *PROMPT_WORDS])))
    tiny_model(family, layers=2, vocab=len(tokenizer), seed=seed).save_pretrained(out)
    return out


def _text(rng: random.Random, low: int = 4, high: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_pubmedqa(path: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = [
        {
            "id": str(1000 + i),
            "question": _text(rng, 3, 8) + "?",
            "context": _text(rng, 10, 40),
            "long_answer": _text(rng),
            "label": rng.choice(["yes", "yes", "no", "maybe"]),
            "split": "test" if i % 2 else "train",
            "official_split": "test",
        }
        for i in range(n)
    ]
    return write_jsonl(path, rows)


def write_cuad(path: Path, n: int = 20, seed: int = 1) -> Path:
    rng = random.Random(seed)
    kinds = ["Anti-Assignment", "Governing Law"]
    rows = [
        {
            "task": rng.choice(kinds),
            "text": _text(rng),
            "label": rng.choice(["Yes", "No"]),
            "split": "test" if i % 3 else "train",
            "orig_split": "test",
        }
        for i in range(n)
    ]
    return write_jsonl(path, rows)


def write_medquad(path: Path, n: int = 20, seed: int = 2) -> Path:
    rng = random.Random(seed)
    qtypes = ["information", "symptoms", "treatment", "genetic changes"]
    rows = [
        {
            "id": f"3_GHR_QA/{i:07d}-1",
            "source": "3_GHR_QA",
            "focus": _text(rng, 1, 2),
            "qtype": rng.choice(qtypes),
            "question": _text(rng, 3, 10) + "?",
            "answer": _text(rng),
            "split": "test" if i % 4 else "train",
        }
        for i in range(n)
    ]
    return write_jsonl(path, rows)


def write_licences(folder: Path, n: int = 16, seed: int = 3) -> Path:
    """`<key>.LICENSE` files as licensedcode-data ships them: a YAML header between '---' lines, then the text."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        key = f"lic-{i}"
        category = rng.choice(["Permissive", "Copyleft"])
        header = f"---\nkey: {key}\nshort_name: Licence {i}\nname: Licence {i}\ncategory: {category}\n---\n"
        (folder / f"{key}.LICENSE").write_text(header + "\n" + _text(rng, 20, 60) + "\n")
    return folder


def write_task_data(root: Path) -> Path:
    """A data directory laid out like shared/data (plus a licence folder for --task-data)."""
    write_pubmedqa((root / "health").mkdir(parents=True, exist_ok=True) or root / "health" / "pubmedqa_l.jsonl")
    write_medquad(root / "health" / "medquad.jsonl")
    write_cuad((root / "legal").mkdir(parents=True, exist_ok=True) or root / "legal" / "cuad.jsonl")
    write_licences(root / "licenses")
    write_jsonl(root / "general.jsonl", [{"text": _text(random.Random(i), 20, 40)} for i in range(12)])
    return root


def prune_rows_by_magnitude(model, sparsity: float = 0.5):
    """Zero the floor(sparsity·in) smallest-magnitude entries of every row of every projection, in place."""
    import math

    import torch

    from exert_ds.model.architecture import block_linears, decoder_layers

    with torch.no_grad():
        for block in range(len(decoder_layers(model))):
            for linear in block_linears(model, block).values():
                w = linear.weight
                drop = w.abs().argsort(dim=1)[:, : math.floor(sparsity * w.shape[1])]
                w.scatter_(1, drop, 0.0)
    return model
