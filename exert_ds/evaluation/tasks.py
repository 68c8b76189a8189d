"""The labelled evaluation tasks as data (evaluation.md): where the records come from, which rows, the prompt,
and the text each label is verbalised as. Adding a task is one `Task(...)` entry in TASKS.

Records load through HF `datasets` (exert_ds.data.load_records) from a file or folder under the user's data
directory, from a path given per task, or from a hub data set name; the licence task reads the licence texts
that the PyPI package `licensedcode-data` installs (or a folder of .LICENSE files in the same format).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from string import Formatter

import numpy as np
import yaml

from exert_ds.data import DataSource, check_data_file, load_records
from exert_ds.errors import ConfigError

LICENSEDCODE = "licensedcode"  # Task.source of the licence texts installed by `pip install licensedcode-data`


@dataclass(frozen=True)
class Task:
    """One labelled task: prompt.format(**record) followed by each label's verbalisation, scored by likelihood.

    `source` is a path relative to the data directory, a hub data set name, or LICENSEDCODE. `split` selects
    rows: a hub split, or for local files the rows whose `split_field` equals it (None: all rows).
    `verbalisations` maps label value → appended text; None means every label value present in the selected
    rows, verbalised as " <value>". `max_chars` cuts a field's text to its first N characters before formatting.
    """

    name: str
    domain: str
    source: str
    prompt: str
    label_field: str
    verbalisations: dict[str, str] | None = None
    split: str | None = "test"
    split_field: str = "split"
    max_chars: dict[str, int] = field(default_factory=dict)

    def prompt_fields(self) -> list[str]:
        return [name for _, name, _, _ in Formatter().parse(self.prompt) if name]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="pubmedqa",
            domain="health",
            source="health/pubmedqa_l.jsonl",
            prompt="Context: {context}\nQuestion: {question}\nAnswer (yes, no or maybe):",
            label_field="label",
            verbalisations={"yes": " yes", "no": " no", "maybe": " maybe"},
        ),
        Task(
            name="medquad_qtype",
            domain="health",
            source="health/medquad.jsonl",
            prompt="Question: {question}\nQuestion type:",
            label_field="qtype",
        ),
        Task(
            name="cuad",
            domain="legal",
            source="legal/cuad.jsonl",
            prompt='Clause: {text}\nIs this a "{task}" clause? Answer (Yes or No):',
            label_field="label",
            verbalisations={"Yes": " Yes", "No": " No"},
        ),
        Task(
            name="license_category",
            domain="legal",
            source=LICENSEDCODE,
            prompt="License text:\n{text}\nLicense category:",
            label_field="category",
            max_chars={"text": 2000},
        ),
    )
}


@dataclass(frozen=True)
class TaskExamples:
    """The selected examples of one task: prompt text and gold label per example, and the label set."""

    task: Task
    prompts: list[str]
    gold: list[str]
    labels: list[str]  # label values, in the order of `verbalisations`
    verbalisations: list[str]
    source: str  # where the records were read from


def get_task(name: str) -> Task:
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"--tasks: unknown task {name!r}; {hint}known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def licence_split(key: str) -> str:
    """Licences have no split of their own: half of them, chosen by a hash of the key, are the test split."""
    return "test" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % 2 else "train"


def licensedcode_dir() -> Path:
    """The licence folder of the installed licensedcode-data (a namespace package: found by spec, not imported)."""
    spec = importlib.util.find_spec(LICENSEDCODE)
    roots = list(spec.submodule_search_locations or []) if spec else []
    found = [Path(r) / "data" / "licenses" for r in roots if (Path(r) / "data" / "licenses").is_dir()]
    if not found:
        raise ConfigError(
            "task license_category needs the licence texts: pip install licensedcode-data (or install "
            "exert_ds[eval]), or give --task-data license_category=DIR of .LICENSE files"
        )
    return found[0]


def licensedcode_records(licenses_dir: str | Path | None = None) -> list[dict[str, str]]:
    """key, category, text, split of every licence with a non-empty text and a category, in key order.

    Each `<key>.LICENSE` holds a YAML header between '---' lines (key, name, category, ...) and then the text.
    """
    directory = Path(licenses_dir) if licenses_dir else licensedcode_dir()
    files = sorted(directory.glob("*.LICENSE")) if directory.is_dir() else []
    if not files:
        raise ConfigError(f"task license_category: {directory} holds no .LICENSE files")
    records = []
    for path in files:
        try:
            check_data_file(path)
        except ValueError as err:
            raise ConfigError(f"task license_category: {err}") from err
        parts = path.read_text(encoding="utf-8").split("---", 2)
        if len(parts) != 3 or parts[0].strip():
            raise ConfigError(
                f"{path}: not a licensedcode .LICENSE file (a YAML header between '---' lines, then text)"
            )
        _, header, text = parts
        meta = yaml.safe_load(header) or {}
        key, category = meta.get("key", path.stem), meta.get("category")
        if category and text.strip():
            records.append({"key": key, "category": category, "text": text.strip(), "split": licence_split(key)})
    return records


def _records(task: Task, where: str) -> list[dict]:
    """The task's rows (split applied) from a local file/folder or a hub data set."""
    if task.source == LICENSEDCODE:
        rows = licensedcode_records(where)
        return [r for r in rows if task.split is None or r[task.split_field] == task.split]
    local = Path(where).expanduser().exists()
    if not local and (where.startswith((".", "/", "~")) or where.count("/") > 1 or "." in Path(where).name):
        raise ConfigError(f"task {task.name}: data file {where} does not exist; give --data-dir or --task-data")
    if local:
        wanted = {task.split_field: task.split} if task.split is not None else None
        source = DataSource(where, text_field=task.label_field, filter=wanted)
    else:
        source = DataSource(where, text_field=task.label_field, split=task.split or "train")
    try:
        records = load_records(source)
    except ValueError as err:
        raise ConfigError(f"task {task.name} ({where}): {' '.join(str(err).split())}") from err
    missing = [f for f in task.prompt_fields() if f not in records.column_names]
    if missing:
        raise ConfigError(
            f"task {task.name} ({where}): field(s) {', '.join(missing)} missing; "
            f"available: {', '.join(records.column_names)}"
        )
    return records.to_list()


def task_location(task: Task, data_dir: str | Path | None, override: str | None) -> str:
    """Where the task's records are read: the per-task override, else source under data_dir."""
    if override:
        return override
    if Path(task.source).is_absolute():  # a task file's source, resolved next to the file
        return task.source
    if task.source == LICENSEDCODE:
        return str(licensedcode_dir())
    if data_dir is None:
        raise ConfigError(f"task {task.name} reads {task.source}: give --data-dir or --task-data {task.name}=PATH")
    base = Path(data_dir)
    if not base.is_dir():
        raise ConfigError(f"--data-dir {data_dir} is not a directory (task {task.name} reads {task.source} in it)")
    return str(base / task.source)


def load_task(
    task: Task, data_dir: str | Path | None, override: str | None = None, max_examples: int | None = None, seed: int = 0
) -> TaskExamples:
    """The task's examples; with `max_examples`, a subset drawn by `seed` and kept in file order."""
    where = task_location(task, data_dir, override)
    rows = _records(task, where)
    if task.verbalisations is not None:
        labels = list(task.verbalisations)
        verbal = list(task.verbalisations.values())
        unknown = sorted({str(r[task.label_field]) for r in rows} - set(labels))
        if unknown:
            raise ConfigError(f"task {task.name}: label values {unknown} are not among its labels {labels}")
    else:
        labels = sorted({str(r[task.label_field]) for r in rows})
        verbal = [f" {label}" for label in labels]
    if not rows:
        raise ConfigError(f"task {task.name}: no rows in split {task.split!r} of {where}")
    if max_examples is not None and max_examples < len(rows):
        pick = np.sort(np.random.default_rng(seed).permutation(len(rows))[:max_examples])
        rows = [rows[i] for i in pick]

    def field_text(row: dict, name: str) -> str:
        text = str(row[name])
        return text[: task.max_chars[name]] if name in task.max_chars else text

    prompts = [task.prompt.format(**{name: field_text(r, name) for name in task.prompt_fields()}) for r in rows]
    gold = [str(r[task.label_field]) for r in rows]
    return TaskExamples(task, prompts, gold, labels, verbal, where)
