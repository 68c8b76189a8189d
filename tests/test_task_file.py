"""`exert-ds eval --task-file`: tasks defined in YAML score exactly like the same definition built into the package,
and every malformed file stops with one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from exert_ds.cli import main
from exert_ds.errors import ConfigError
from exert_ds.evaluation.task_file import load_task_file
from exert_ds.evaluation.tasks import TASKS
from tests.eval_data import save_eval_model_dir, write_task_data

# pubmedqa's built-in definition, spelled as a task file; `yes`/`no` must stay strings (YAML 1.2)
TASK_FILE = """
tasks:
  - name: my_pubmedqa
    domain: health
    source: data/health/pubmedqa_l.jsonl
    prompt: "Context: {context}\\nQuestion: {question}\\nAnswer (yes, no or maybe):"
    label_field: label
    verbalisations: {yes: " yes", no: " no", maybe: " maybe"}
  - name: my_qtype
    domain: health
    source: data/health/medquad.jsonl
    prompt: "Question: {question}\\nQuestion type:"
    label_field: qtype
"""


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private datasets cache, and the task registry as it was before each test."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    before = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(before)


def common(model: Path, out: Path) -> list[str]:
    return [
        "eval",
        "--model",
        str(model),
        "--micro-batch",
        "3",
        "--bootstrap",
        "100",
        "--save-scores",
        "--out",
        str(out),
    ]


def test_file_tasks_score_like_the_built_in_definitions(tmp_path):
    model = save_eval_model_dir(tmp_path / "model")
    data = write_task_data(tmp_path / "data")
    (tmp_path / "tasks.yaml").write_text(TASK_FILE)
    mine, builtin = tmp_path / "mine.json", tmp_path / "builtin.json"
    assert main([*common(model, mine), "--task-file", str(tmp_path / "tasks.yaml")]) == 0  # no --data-dir needed
    assert main([*common(model, builtin), "--tasks", "pubmedqa,medquad_qtype", "--data-dir", str(data)]) == 0
    got, want = json.loads(mine.read_text())["tasks"], json.loads(builtin.read_text())["tasks"]
    assert list(got) == ["my_pubmedqa", "my_qtype"]
    for name, reference in (("my_pubmedqa", "pubmedqa"), ("my_qtype", "medquad_qtype")):
        for key in ("loglik", "predictions", "labels", "verbalisations", "accuracy", "macro_f1", "n"):
            assert got[name][key] == want[reference][key], (name, key)
    assert got["my_pubmedqa"]["labels"] == ["yes", "no", "maybe"]


GOOD = {"name": "t", "domain": "d", "source": "x.jsonl", "prompt": "Q: {q}", "label_field": "label"}


def task_yaml(**changes) -> str:
    import yaml

    task = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
    return yaml.safe_dump({"tasks": [task]})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tasks: [", "is not valid YAML"),
        ("other: 1", "the top level must be one key, 'tasks'"),
        ("tasks: []", "key 'tasks' must be a non-empty list"),
        ("tasks: [3]", "tasks[0] must be a mapping"),
        (task_yaml(prompt=None), "tasks[0].prompt is missing"),
        (task_yaml(promt="Q: {q}"), "key 'tasks[0].promt' is unknown; did you mean 'tasks[0].prompt'?"),
        (task_yaml(label_field=3), "key 'tasks[0].label_field' must be str, got int 3"),
        (task_yaml(verbalisations=["a", "b"]), "key 'tasks[0].verbalisations' must be"),
        (task_yaml(verbalisations={"a": 1}), "key 'tasks[0].verbalisations.a' must be a non-empty string"),
        (task_yaml(max_chars={"q": 0}), "key 'tasks[0].max_chars.q' must be a positive integer"),
        (task_yaml(prompt="Q: {q"), "key 'tasks[0].prompt'"),
        (task_yaml(prompt="no fields"), "key 'tasks[0].prompt' must name record fields"),
        (task_yaml(name="pubmedqa"), "key 'tasks[0].name': 'pubmedqa' is a built-in task"),
        (task_yaml(domain=" "), "key 'tasks[0].domain' is empty"),
    ],
)
def test_malformed_file_is_one_line_naming_the_key(tmp_path, text, message):
    (tmp_path / "tasks.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_task_file(tmp_path / "tasks.yaml")
    assert str(err.value).startswith(f"--task-file {tmp_path / 'tasks.yaml'}")
    assert message in str(err.value), err.value


def test_eval_says_it_in_one_line_a_task_defined_twice_and_a_missing_file(tmp_path, capsys):
    (tmp_path / "tasks.yaml").write_text("tasks:\n" + "".join("  - " + json.dumps(GOOD) + "\n" for _ in range(2)))
    assert main(["eval", "--model", str(tmp_path), "--task-file", str(tmp_path / "tasks.yaml"), "--out", "r"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exert-ds: error: --task-file ") and "\n" not in err
    assert "key 'tasks[1].name': 't' is defined twice" in err
    assert main(["eval", "--model", str(tmp_path), "--task-file", str(tmp_path / "no.yaml"), "--out", "r"]) == 2
    assert f"--task-file {tmp_path / 'no.yaml'} does not exist" in capsys.readouterr().err
