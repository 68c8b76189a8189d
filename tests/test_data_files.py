"""Data files that cannot give records (issue 21, fault 5): empty, blank, not UTF-8 or not JSON. Every reader
(training, calibration, perplexity sets, evaluation tasks, licence texts) checks its files with
exert_ds.data.check_data_file and stops with one line that names the file, and for a bad byte or a bad JSON line
the line, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import exert_ds.data
from exert_ds.cli import main
from exert_ds.data import DataSource, check_data_file, load_records
from exert_ds.errors import ConfigError
from exert_ds.evaluation.tasks import licensedcode_records
from tests.eval_data import save_eval_model_dir
from tests.fixtures import health_sentences, run_yaml, write_jsonl
from tests.launch import deepspeed_cpu


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def latin1_records(count: int = 40, bad: int = 37) -> bytes:
    """JSON Lines of `count` text records whose record `bad` (1-based) holds 'café' in Latin-1 (byte 0xE9)."""
    lines = [json.dumps({"text": s}) for s in health_sentences(count, seed=2)]
    lines[bad - 1] = '{"text": "caf\xe9 patient fever."}'
    return "".join(line + "\n" for line in lines).encode("latin-1")


BAD_FILES = {"empty": b"", "blank": b"\n\n   \n\t\n\n", "latin1": latin1_records()}


def bad_file(tmp_path: Path, kind: str, name: str = "bad.jsonl") -> tuple[Path, str]:
    """A file of `kind` and the message that names it."""
    path = tmp_path / name
    path.write_bytes(BAD_FILES[kind])
    return path, {
        "empty": f"data file {path} is empty (0 bytes); fill it or leave it out of the source",
        "blank": f"data file {path} holds only blank lines (no records); fill it or leave it out of the source",
        "latin1": f"data file {path}, line 37: byte 0xe9 (at byte {BAD_FILES['latin1'].index(0xE9)} of the file) is "
        "not UTF-8 text; save the file as UTF-8",
    }[kind]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("exert-ds: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
@pytest.mark.parametrize("section", ["data.train", "calibration", "eval.perplexity"])
def test_a_bad_file_among_several_sources_is_named_before_any_work(tmp_path, capsys, kind, section):
    """One source among several in each of the run's readers: one line that names the file (and the line of a bad
    byte), before the process group starts, nothing written."""
    good = write_jsonl(tmp_path / "more.jsonl", [{"text": s} for s in health_sentences(50, seed=1)])
    path, message = bad_file(tmp_path, kind)
    sources = [{"path": str(tmp_path / "health.jsonl")}, {"path": str(path)}, {"path": str(good)}]
    if section == "data.train":
        config = run_yaml(tmp_path, data={"train": sources, "seq_len": 16})
    elif section == "calibration":
        config = run_yaml(tmp_path, calibration={"sources": sources, "num_samples": 8, "seq_len": 16})
    else:
        config = run_yaml(tmp_path, eval={"perplexity": sources, "window": 16})
    capsys.readouterr()
    assert main(["train", "--config", str(config)]) == 2
    assert one_line(capsys) == f"exert-ds: error: {section}: {message}"
    assert not (tmp_path / "run").exists()


@pytest.mark.distributed
def test_two_ranks_stop_with_the_line_and_write_nothing(tmp_path):
    path, message = bad_file(tmp_path, "latin1")
    config = run_yaml(tmp_path, data={"train": [{"path": str(tmp_path / "health.jsonl")}, {"path": str(path)}]})
    proc = deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config)], 2, 300, check=False)
    assert proc.returncode != 0 and f"exert-ds: error: data.train: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_an_evaluation_task_names_its_bad_file(tmp_path, capsys, kind):
    path, message = bad_file(tmp_path, kind, "pubmedqa.jsonl")
    model = save_eval_model_dir(tmp_path / "model")
    capsys.readouterr()  # drop what writing the fixture printed
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(model), "--tasks", "pubmedqa", "--task-data", f"pubmedqa={path}", "--out", str(out)]
    assert main(args) == 2
    assert f"task pubmedqa ({path}): {message}" in one_line(capsys)
    assert not out.exists()


def test_an_evaluation_perplexity_set_names_its_bad_file(tmp_path, capsys):
    path, message = bad_file(tmp_path, "latin1", "held_out.jsonl")
    model = save_eval_model_dir(tmp_path / "model")
    capsys.readouterr()  # drop what writing the fixture printed
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(model), "--perplexity", f"held_out={path}", "--out", str(out)]
    assert main(args) == 2
    assert f"--perplexity held_out: {message}" in one_line(capsys)
    assert not out.exists()


def test_a_licence_file_that_is_not_utf8_is_named(tmp_path):
    folder = tmp_path / "lic"
    folder.mkdir()
    (folder / "mit.LICENSE").write_text("---\nkey: mit\ncategory: Permissive\n---\nPermission is granted\n")
    (folder / "x.LICENSE").write_bytes("---\nkey: x\ncategory: Permissive\n---\nLicenci\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"data file {folder / 'x.LICENSE'}, line 5: byte 0xe9"):
        licensedcode_records(folder)


def test_bad_bytes_are_found_across_the_pieces_a_file_is_read_in(tmp_path, monkeypatch):
    """Files are read in CHUNK_BYTES pieces: a multi-byte character cut by a piece's end is carried over, and a bad
    byte's line is counted across pieces, whatever the piece size."""
    text = "".join(json.dumps({"text": f"é ü 中文 🙂 {i}"}, ensure_ascii=False) + "\n" for i in range(30))
    good = tmp_path / "good.jsonl"
    good.write_text(text, encoding="utf-8")
    data = text.encode("utf-8")
    line_starts = [0] + [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]
    at = line_starts[21] + 5  # inside line 22
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(data[:at] + b"\xff" + data[at:])
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(data + "中".encode()[:2])  # the last character cut off by the end of the file
    for size in (1, 2, 3, 5, 7, 64, 1 << 20):
        monkeypatch.setattr(exert_ds.data, "CHUNK_BYTES", size)
        exert_ds.data._check_data_file.cache_clear()
        check_data_file(good)
        with pytest.raises(ValueError, match=f", line 22: byte 0xff \\(at byte {at} of the file\\)"):
            check_data_file(bad)
        with pytest.raises(ValueError, match=f", line 31: byte 0xe4 \\(at byte {len(data)} of the file\\)"):
            check_data_file(cut)


def test_a_line_that_is_not_a_json_record_is_named(tmp_path):
    lines = [json.dumps({"text": s}) for s in health_sentences(20)]
    lines[11] = '{"text": "unterminated}'
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"data file {path}, line 12: not a JSON record"):
        load_records(DataSource(str(path)))
    array = tmp_path / "array.json"
    array.write_text('[{"text": "a"},\n {"text": "b"')
    with pytest.raises(ValueError, match=f"data file {array}, line 2: not valid JSON"):
        load_records(DataSource(str(array)))


def test_parquet_files_that_cannot_give_records_are_named(tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"data file {empty} is empty"):
        load_records(DataSource(str(empty)))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet at all")
    with pytest.raises(ValueError, match=f"data file {garbage} is not a readable Parquet file"):
        load_records(DataSource(str(garbage)))
    no_rows = tmp_path / "no_rows.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), no_rows)
    with pytest.raises(ValueError, match=f"data file {no_rows} holds no rows"):
        load_records(DataSource(str(no_rows)))


def test_a_folder_source_names_its_bad_file(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": s} for s in health_sentences(5)])
    path, message = bad_file(folder, "empty", "b.jsonl")
    with pytest.raises(ValueError, match=f"data file {path} is empty"):
        load_records(DataSource(str(folder)))
