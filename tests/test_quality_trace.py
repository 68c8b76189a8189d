"""eval/quality/run_all.py --trace-events: the bash it runs after a cell's own evaluation, executed for real on a run
folder whose path holds a space, with the evaluation replaced by a recorder of its arguments."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval" / "quality"))
import run_all  # noqa: E402

RECORDER = """import json, sys
from pathlib import Path
args = sys.argv[1:]
adapter = args[args.index("--adapter") + 1] if "--adapter" in args else None
if adapter is not None and not Path(adapter).is_dir():
    sys.exit(1)
Path(args[args.index("--out") + 1]).write_text(json.dumps({"model": args[args.index("--model") + 1], "adapter": adapter}))
"""


def traced_job(tmp_path: Path, monkeypatch, events: int) -> run_all.Job:
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    monkeypatch.setattr(
        run_all,
        "eval_command",
        lambda job, args, model=None, out=None: [sys.executable, str(recorder), "--model", model, "--out", out],
    )
    run = tmp_path / "runs dir" / "legal-x-0.5-s0"
    for k in range(events):
        (run / "event_experts" / f"event-{k}").mkdir(parents=True)
        (run / "event_adapters" / f"event-{k}").mkdir(parents=True)
    return run_all.Job("legal-x-0.5-s0", "legal", "foresight_pbs_hessian", 0.5, 0, [], run, trace=True)


def test_trace_script_evaluates_before_and_after_every_event(tmp_path, monkeypatch):
    job = traced_job(tmp_path, monkeypatch, events=11)  # event-10 sorts after event-9
    args = argparse.Namespace(set=[f"model.name_or_path={tmp_path / 'base model'}"])
    subprocess.run(["bash", "-c", run_all.trace_script(job, args)], check=True)
    trace, experts = job.model_dir / "trace", job.model_dir / "event_experts"
    assert not (trace / "FAILED").exists()
    assert sorted(p.name for p in trace.glob("*.json")) == sorted(
        f"{stage}-{k}.json" for k in range(11) for stage in ("after", "before")
    )
    for k in range(11):
        after = json.loads((trace / f"after-{k}.json").read_text())
        before = json.loads((trace / f"before-{k}.json").read_text())
        assert after == {"model": str(experts / f"event-{k}"), "adapter": None}
        prev = str(tmp_path / "base model") if k == 0 else str(experts / f"event-{k - 1}")
        assert before == {"model": prev, "adapter": str(job.model_dir / "event_adapters" / f"event-{k}")}


def test_a_failed_trace_is_marked_and_the_cell_stands(tmp_path, monkeypatch):
    job = traced_job(tmp_path, monkeypatch, events=2)
    (job.model_dir / "event_adapters" / "event-1").rmdir()  # the recorder fails on a missing adapter
    args = argparse.Namespace(set=[f"model.name_or_path={tmp_path}"])
    done = subprocess.run(["bash", "-c", "true && " + run_all.trace_script(job, args)])
    assert done.returncode == 0 and (job.model_dir / "trace" / "FAILED").exists()
    assert (job.model_dir / "trace" / "after-1.json").exists() and not (
        job.model_dir / "trace" / "before-1.json"
    ).exists()
