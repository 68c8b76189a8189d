"""Training examples and calibration tokens from local JSONL/JSON/Parquet files, folders of them, or hub data sets.

Records go through HF `datasets` and the tokenizer's own batch encoding (no per-token Python), and every
ordering is drawn from a seed, so each rank and each re-run of a config sees the same tokens.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import BinaryIO

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from exert_ds.config import DATA_FORMATS, DataSource

BUILDERS = {".jsonl": "json", ".jsonl.gz": "json", ".json": "json", ".parquet": "parquet"}
IGNORE_INDEX = -100  # label of tokens without loss (the default ignore_index of torch's cross entropy)
COLUMNS = ("input_ids", "labels", "attention_mask")
CHUNK_BYTES = 1 << 24  # data files are checked in pieces of 16 MiB


@dataclass
class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length examples as N × seq_len tensors; an item is the keyword arguments of a causal LM's forward."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "attention_mask": self.attention_mask[i]}

    def whole_batches(self, batch: int) -> TokenBlocks:
        """The first ⌊N / batch⌋ · batch examples: what an epoch of whole global batches of `batch` examples
        (DeepSpeed's train_batch_size) uses. The rest is dropped every epoch, as DataLoader's drop_last drops it."""
        count = len(self) // batch * batch
        return TokenBlocks(self.input_ids[:count], self.labels[:count], self.attention_mask[:count])


def load_records(source: DataSource) -> datasets.Dataset:
    """The source's records after `filter` and `max_records`, with every field its format reads checked up front."""
    wanted = dict(source.filter or {})
    needed = [*wanted, *(field for _, fields in _templates(source).values() for field in fields.values())]
    local = check_source_files(source)
    if local:
        builder, files = local
        try:
            records = datasets.load_dataset(builder, data_files=files, split="train")
        except (datasets.exceptions.DatasetGenerationError, pa.ArrowException) as err:
            raise ValueError(_load_problem(files, err)) from err
    else:
        records = datasets.load_dataset(source.path, split=source.split)
    for name in needed:
        if name not in records.column_names:
            raise ValueError(
                f"field {name!r} is not in {source.path}; available fields: {', '.join(records.column_names)} "
                "(fix the source's *_field, template or filter)"
            )
    if wanted:
        values = list(wanted.values())

        def keep(*columns: list) -> list[bool]:
            return [list(row) == values for row in zip(*columns, strict=True)]

        records = records.filter(keep, batched=True, input_columns=list(wanted), keep_in_memory=True)
    if source.max_records is not None:
        records = records.select(range(min(source.max_records, len(records))))
    if len(records) == 0:
        raise ValueError(
            f"data source {source.path} gives no records (filter {wanted}, max_records "
            f"{source.max_records}); check the file, filter values and max_records"
        )
    return records


def tokenize_source(
    source: DataSource, tokenizer: PreTrainedTokenizerBase, seq_len: int, packing: bool
) -> datasets.Dataset:
    """Examples of exactly `seq_len` tokens with columns input_ids, labels (-100: no loss), attention_mask.

    Text with packing: all documents (each + EOS) concatenated and cut into full blocks, the remainder dropped.
    Otherwise one example per record, padded: text documents truncated from the right; instruction examples
    keep the whole response + EOS where it fits, cut the prompt from the right, and take loss on the response only.
    """
    encoded = _encode(source, tokenizer)
    if packing and source.format == "text":
        blocks = _blocks(_flat(encoded, "ids"), seq_len)
        return datasets.Dataset.from_dict(
            {"input_ids": blocks, "labels": blocks, "attention_mask": np.ones_like(blocks)}
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)

    def examples(batch: dict) -> dict:
        rows = [
            _example(ids[:n], ids[n:], seq_len, pad) for ids, n in zip(batch["ids"], batch["prompt_len"], strict=True)
        ]
        return {name: [row[i] for row in rows] for i, name in enumerate(COLUMNS)}

    return encoded.map(examples, batched=True, remove_columns=encoded.column_names, keep_in_memory=True)


def build_train_dataset(
    sources: list[DataSource], tokenizer: PreTrainedTokenizerBase, seq_len: int, packing: bool, seed: int
) -> TokenBlocks:
    """All sources' examples in one shuffled order drawn from `seed`, so a run's data order is reproducible."""
    parts = [tokenize_source(source, tokenizer, seq_len, packing) for source in sources]
    tensors = {name: torch.cat([torch.from_numpy(_blocks(_flat(p, name), seq_len)) for p in parts]) for name in COLUMNS}
    count = tensors["input_ids"].shape[0]
    if count == 0:
        raise ValueError(f"data.train yields no example of {seq_len} tokens; add data or lower data.seq_len")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return TokenBlocks(**{name: t[order] for name, t in tensors.items()})


def packed_windows(sources: list[DataSource], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.LongTensor:
    """All consecutive windows (rows × seq_len) of the sources' packed text (documents + EOS, sources in order;
    prompt + response for instruction data), the remainder dropped. Calibration and perplexity read it."""
    stream = np.concatenate([_flat(_encode(source, tokenizer), "ids") for source in sources])
    return torch.from_numpy(_blocks(stream, seq_len))


def calibration_batch(
    sources: list[DataSource], tokenizer: PreTrainedTokenizerBase, num_samples: int, seq_len: int, seed: int
) -> torch.LongTensor:
    """`num_samples` distinct windows of `seq_len` tokens (num_samples × seq_len) from the sources' packed text
    (prompt + response for instruction data), picked by `seed` so every rank and re-run prunes on the same tokens."""
    windows = packed_windows(sources, tokenizer, seq_len)
    if windows.shape[0] < num_samples:
        raise ValueError(
            f"calibration needs {num_samples} sequences of {seq_len} tokens but the data holds only "
            f"{windows.shape[0]} such windows; lower calibration.num_samples/seq_len or add data"
        )
    pick = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))[:num_samples]
    return windows[pick]


def check_source_files(source: DataSource) -> tuple[str, list[str]] | None:
    """check_data_file on every file of a local source; returns its (datasets builder, files), None for a hub
    data set. Raises ValueError naming the file that cannot give records."""
    local = _local_files(source)
    for file in local[1] if local else ():
        check_data_file(file)
    return local


def check_data_file(path: str | Path) -> None:
    """Raise ValueError, naming the file (and for text the line), if `path` cannot give records: 0 bytes; a JSON or
    JSON Lines file (.gz too) or any other text file that is not UTF-8 or holds only blank lines; a Parquet file
    whose footer does not read or that holds no rows. Every reader of data files (training, calibration, perplexity,
    evaluation tasks) calls it before reading, so each fault is reported the same way; Arrow itself would take
    bad bytes into a string column and fail only when the row is read, without saying where."""
    path = Path(path)
    stat = path.stat()
    _check_data_file(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _check_data_file(path: str, size: int, mtime_ns: int) -> None:
    """check_data_file for one version of a file (size, mtime): a run reads a file for training, calibration and
    perplexity, and checks it once."""
    if size == 0:
        raise ValueError(f"data file {path} is empty (0 bytes); fill it or leave it out of the source")
    if _builder(path) == "parquet":
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"data file {path} is not a readable Parquet file ({err})") from err
        if not rows:
            raise ValueError(f"data file {path} holds no rows; fill it or leave it out of the source")
        return
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as stream:
            problem = _text_problem(stream)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"data file {path} could not be read: {err}") from err
    if problem:
        raise ValueError(f"data file {path}{problem}")


def _text_problem(stream: BinaryIO) -> str | None:
    """', line N: ...' for the first byte that is not UTF-8, ' holds only blank lines ...' for a file of
    whitespace, or None; read in CHUNK_BYTES pieces (a character cut by a piece's end is carried over)."""
    line, offset, carry, blank = 1, 0, b"", True
    while True:
        chunk = stream.read(CHUNK_BYTES)
        data = carry + chunk
        if not data:
            break
        try:
            data.decode("utf-8")
            good, carry = data, b""
        except UnicodeDecodeError as err:
            cut = err.reason == "unexpected end of data" and err.end == len(data)
            if not (cut and chunk):  # a byte that is not UTF-8, or a character cut off by the end of the file
                where = line + data.count(b"\n", 0, err.start)
                return (
                    f", line {where}: byte 0x{data[err.start]:02x} (at byte {offset + err.start} of the file) is not "
                    "UTF-8 text; save the file as UTF-8"
                )
            good, carry = data[: err.start], data[err.start :]
        blank = blank and (not good or good.isspace())
        line += good.count(b"\n")
        offset += len(good)
        if not chunk:
            break
    return " holds only blank lines (no records); fill it or leave it out of the source" if blank else None


def _load_problem(files: list[str], err: Exception) -> str:
    """What `datasets` could not read: the first line of a JSON Lines file that is not a JSON object, else its
    message (the files checked by check_data_file are UTF-8 and not blank)."""
    for file in files:
        if _builder(file) != "json":
            continue
        with gzip.open(file, "rt", encoding="utf-8") if file.endswith(".gz") else open(file, encoding="utf-8") as f:
            text = f.read()
        try:
            json.loads(text)
            continue  # one JSON document (an array or an object of records)
        except json.JSONDecodeError as bad:
            if text.lstrip().startswith("["):  # one array of records
                return f"data file {file}, line {bad.lineno}: not valid JSON ({bad.msg}, column {bad.colno})"
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as bad:
                return f"data file {file}, line {number}: not a JSON record ({bad.msg}, column {bad.colno})"
            if not isinstance(record, dict):
                return f"data file {file}, line {number}: a JSON {type(record).__name__}, not a record (an object)"
    cause = err.__cause__ or err
    return f"data files {', '.join(files)} could not be read: {' '.join(str(cause).split())}"


def _builder(name: str) -> str | None:
    return next((builder for ext, builder in BUILDERS.items() if name.endswith(ext)), None)


def _looks_local(path: str) -> bool:
    """Hub names are 'name' or 'owner/name'; anything else that is not on disk is a mistyped local path."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or _builder(path) is not None


def _local_files(source: DataSource) -> tuple[str, list[str]] | None:
    """(datasets builder, files) for a local file or folder; None for a hub data set name."""
    path = Path(source.path).expanduser()
    if path.is_dir():
        files = sorted(str(f) for f in path.iterdir() if f.is_file() and _builder(f.name))
        builders = {_builder(f) for f in files}
        if len(builders) != 1:
            problem = "mixes JSON and Parquet files" if builders else "holds no .jsonl/.json/.parquet file"
            raise ValueError(f"data directory {source.path} {problem}; give each kind of file its own source")
        files_builder = builders.pop()
    elif path.is_file():
        files, files_builder = [str(path)], _builder(path.name)
        if files_builder is None:
            raise ValueError(f"data file {source.path} must end in {', '.join(BUILDERS)}")
    elif _looks_local(source.path):
        raise ValueError(f"data path {source.path} does not exist")
    else:
        return None
    if source.split != "train":
        raise ValueError(
            f"data source {source.path}: split applies to hub data sets; for a local file use filter: "
            f"{{split: {source.split}}}"
        )
    return files_builder, files


def _templates(source: DataSource) -> dict[str, tuple[str, dict[str, str]]]:
    """Output column → (template, placeholder → record field); text is the template '{text}' over text_field."""
    if source.format not in DATA_FORMATS:
        raise ValueError(f"data source {source.path}: format must be 'text' or 'instruction', got {source.format!r}")
    if source.format == "text":
        return {"text": ("{text}", {"text": source.text_field})}
    aliases = {"prompt": source.prompt_field, "response": source.response_field}
    return {
        column: (template, {name: aliases.get(name, name) for _, name, _, _ in Formatter().parse(template) if name})
        for column, template in (("prompt", source.prompt_template), ("response", source.response_template))
    }


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set model.tokenizer to one that has, or add one")
    return tokenizer.eos_token_id


def _encode(source: DataSource, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """Per record `ids` = [prompt] + text or response + EOS and `prompt_len`, its count of leading prompt tokens.

    Prompt and text get the tokenizer's special tokens (BOS where the model has one), the response none,
    so that prompt + response reads like one sequence that starts where the model expects."""
    records = load_records(source)
    templates = _templates(source)
    eos = _eos_id(tokenizer)

    def encode(batch: dict) -> dict:
        rows = range(len(next(iter(batch.values()))))
        text = {
            column: [template.format(**{name: batch[field][i] for name, field in fields.items()}) for i in rows]
            for column, (template, fields) in templates.items()
        }
        if "text" in text:
            body, prompts = tokenizer(text["text"])["input_ids"], [[] for _ in rows]
        else:
            body = tokenizer(text["response"], add_special_tokens=False)["input_ids"]
            prompts = tokenizer(text["prompt"])["input_ids"]
        return {
            "ids": [p + b + [eos] for p, b in zip(prompts, body, strict=True)],
            "prompt_len": [len(p) for p in prompts],
        }

    return records.map(
        encode, batched=True, remove_columns=records.column_names, keep_in_memory=True, desc=f"tokenizing {source.path}"
    )


def _example(prompt: list[int], response: list[int], seq_len: int, pad: int) -> tuple[list[int], list[int], list[int]]:
    """input_ids, labels, attention_mask of one padded example: the response kept whole where it fits in
    seq_len (cut only if it alone is longer), the prompt cut from the right to make room."""
    response = response[:seq_len]
    prompt = prompt[: seq_len - len(response)]
    fill = seq_len - len(prompt) - len(response)
    return (
        prompt + response + [pad] * fill,
        [IGNORE_INDEX] * len(prompt) + response + [IGNORE_INDEX] * fill,
        [1] * (len(prompt) + len(response)) + [0] * fill,
    )


def _flat(table: datasets.Dataset, column: str) -> np.ndarray:
    """A list column's rows concatenated as one writable int64 array, through Arrow rather than Python lists."""
    return pc.list_flatten(table.with_format("arrow")[column]).to_numpy().astype(np.int64)


def _blocks(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """The full seq_len blocks of a token stream (rows × seq_len), the remainder dropped."""
    return stream[: len(stream) // seq_len * seq_len].reshape(-1, seq_len)
