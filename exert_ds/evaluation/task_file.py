"""`exert-ds eval --task-file my_tasks.yaml`: labelled tasks defined in a YAML file, with the fields of
`evaluation.tasks.Task`, without editing the package.

    tasks:
      - name: my_yes_no                       # required; not the name of a built-in task
        domain: health                        # required
        source: data/my_qa.jsonl              # required: a path (relative to this file's folder, else to
                                              #   --data-dir) or a hub data set name
        prompt: "Question: {question}\\nAnswer (yes or no):"   # required; {fields} of each record
        label_field: label                    # required
        verbalisations: {yes: " yes", no: " no"}   # optional: label value → appended text (default " <value>")
        split: test                           # optional (default test; null = every row)
        split_field: split                    # optional (default split)
        max_chars: {question: 2000}           # optional: cut a field to its first N characters

YAML 1.2 booleans (only true/false), so `yes`/`no` stay strings. A malformed file stops with one line naming the
file and the key (`tasks[1].prompt`) and what to change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from string import Formatter

import yaml

from exert_ds.config import build_dataclass, parse_yaml
from exert_ds.errors import ConfigError
from exert_ds.evaluation.tasks import TASKS, Task

REQUIRED = tuple(
    f.name
    for f in dataclasses.fields(Task)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)
BUILT_IN = frozenset(TASKS)


def _check_task(raw: object, where: str, base: Path) -> Task:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of Task fields, got {type(raw).__name__} {raw!r}")
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise ConfigError(f"{where}.{missing[0]} is missing; a task needs {', '.join(REQUIRED)}")
    raw = dict(raw)
    if isinstance(raw.get("verbalisations"), dict):  # label values are compared as text: 0 and "0" are one label
        raw["verbalisations"] = {str(k): v for k, v in raw["verbalisations"].items()}
    try:
        task = build_dataclass(Task, raw, where)
    except ConfigError as err:
        raise ConfigError(str(err).replace("config key ", "key ").replace("config section ", "key ")) from err
    for key in ("name", "domain", "source", "prompt", "label_field"):
        if not getattr(task, key).strip():
            raise ConfigError(f"key '{where}.{key}' is empty")
    for label, text in (task.verbalisations or {}).items():
        if not isinstance(text, str) or not text:
            raise ConfigError(f"key '{where}.verbalisations.{label}' must be a non-empty string, got {text!r}")
    for name, limit in task.max_chars.items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"key '{where}.max_chars.{name}' must be a positive integer, got {limit!r}")
    try:
        fields = [name for _, name, _, _ in Formatter().parse(task.prompt) if name is not None]
    except ValueError as err:
        raise ConfigError(f"key '{where}.prompt': {err} (write a literal brace as {{{{ or }}}})") from err
    if not fields or any(not name.isidentifier() for name in fields):
        raise ConfigError(f"key '{where}.prompt' must name record fields as {{field}}, got {task.prompt!r}")
    if task.name in BUILT_IN:
        raise ConfigError(f"key '{where}.name': {task.name!r} is a built-in task; choose another name")
    local = base / task.source
    if not Path(task.source).is_absolute() and local.exists():
        task = dataclasses.replace(task, source=str(local.resolve()))
    return task


def load_task_file(path: str | Path) -> dict[str, Task]:
    """name → Task for every task in the file, in file order. ConfigError (one line, naming the file and key)
    when the file is missing, is not YAML, or a task is malformed or defined twice."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--task-file {path} does not exist")
    try:
        doc = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--task-file {path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(doc, dict) or set(doc) != {"tasks"}:
        raise ConfigError(f"--task-file {path}: the top level must be one key, 'tasks', holding a list of tasks")
    if not isinstance(doc["tasks"], list) or not doc["tasks"]:
        raise ConfigError(f"--task-file {path}: key 'tasks' must be a non-empty list of tasks")
    tasks: dict[str, Task] = {}
    for i, raw in enumerate(doc["tasks"]):
        try:
            task = _check_task(raw, f"tasks[{i}]", path.parent)
        except ConfigError as err:
            raise ConfigError(f"--task-file {path}: {err}") from err
        if task.name in tasks:
            raise ConfigError(f"--task-file {path}: key 'tasks[{i}].name': {task.name!r} is defined twice")
        tasks[task.name] = task
    return tasks


def register_task_file(path: str | Path) -> list[str]:
    """Add the file's tasks to the task registry (`tasks.TASKS`, what `--tasks` names); their names in order."""
    tasks = load_task_file(path)
    TASKS.update(tasks)
    return list(tasks)
