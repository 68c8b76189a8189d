"""Issue 16's reproduction: SmolLM2-135M experts at 50% for three pairings, then `exert-ds analyze` on them.

Pairings (every run saves the adapter of each prune event, `train.save_event_adapters`):
- domain: health (eval/quality/health.yaml) against legal (eval/quality/legal.yaml), seed 0;
- task: MedQuAD question-type instructions (health_qtype.yaml) against MedQuAD answers (health_answers.yaml), seed 0;
- seed: health.yaml with seed 0 against seed 1 (the noise floor).
The five trainings run at once (a 135M model leaves an H200 mostly idle), one process each on ZeRO-3; then:
- masks: `analyze masks` on the five sparse experts (output_dir/expert, read through the per-rank files);
- subspaces: `analyze subspaces` on event 0's adapters (trained on the dense model in epoch 0) against each other and
  against the dense model's top-r singular subspaces, and on the final event's adapters against each other;
- energy: `analyze energy` (ZeRO-3) of the dense model on each pairing's calibration data, with calibration seed 0
  and 1 (the same data, other windows: the noise floor), and of the seed-0/seed-1 health experts and the legal expert
  on the health and legal calibration data.
Writes under --out: runs' logs, masks/, subspaces/, energy/, analysis_raw.json (commands, return codes, seconds), and
analysis.md by write_report.py. Unattended: `bash eval/analysis/run_analysis.sh` on a GPU machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "eval"))
from job_env import single_process_env  # noqa: E402

QUALITY = REPO / "eval" / "quality"
RUNS = REPO / "runs" / "analysis"
BASE = REPO / ".stage" / "smollm2_hf"
DS_INFERENCE = REPO / "ds_configs" / "zero3_small_model_bf16.json"
TRAININGS = {  # name → (config, seed)
    "health-s0": (QUALITY / "health.yaml", 0),
    "health-s1": (QUALITY / "health.yaml", 1),
    "legal-s0": (QUALITY / "legal.yaml", 0),
    "qtype-s0": (HERE / "health_qtype.yaml", 0),
    "answers-s0": (HERE / "health_answers.yaml", 0),
}
PAIRINGS = {"domain": ("health-s0", "legal-s0"), "task": ("qtype-s0", "answers-s0"), "seed": ("health-s0", "health-s1")}
DATA = {
    name: TRAININGS[run][0]
    for name, run in (("health", "health-s0"), ("legal", "legal-s0"), ("qtype", "qtype-s0"), ("answers", "answers-s0"))
}


def exert(*args: str) -> list[str]:
    return [sys.executable, "-m", "exert_ds", *args]


def run_all(jobs: dict[str, list[str]], gpus: int, logs: Path, deadline: float, record: dict) -> None:
    """Start every job at once (slot i on GPU i % gpus), wait for all or the deadline; record rc and seconds."""
    started = {name: (subprocess.Popen(cmd, cwd=REPO, env=single_process_env(i, gpus, 4, 29700), stdout=(logs / f"{name}.log").open("w"),
                                       stderr=subprocess.STDOUT), time.monotonic())
               for i, (name, cmd) in enumerate(jobs.items())}  # fmt: skip
    for name, (proc, t0) in started.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "killed at the deadline"
        record[name] = {"command": jobs[name], "returncode": rc, "seconds": round(time.monotonic() - t0, 1)}
        print(f"{name}: rc={rc} ({record[name]['seconds']} s)", flush=True)


def trainings(runs: Path, extra: list[str]) -> dict[str, list[str]]:
    sets = [a for pair in extra for a in ("--set", pair)]
    return {
        name: exert("train", "--config", str(config), "--set", f"train.seed={seed}",
                    "--set", f"train.output_dir={runs / name}", "--set", "train.save_event_adapters=true", *sets)
        for name, (config, seed) in TRAININGS.items()
    }  # fmt: skip


def analyses(out: Path, last_event: int, args: argparse.Namespace) -> dict[str, list[str]]:
    runs, base = args.runs, args.base
    names = list(TRAININGS)
    jobs = {
        "masks": exert("analyze", "masks", *(str(runs / n / "expert") for n in names), "--names", ",".join(names),
                       "--out", str(out / "masks")),
        "subspaces-event0": exert("analyze", "subspaces", *(str(runs / n / "event_adapters" / "event-0") for n in names),
                                  "--names", ",".join(names), "--base", str(base), "--out", str(out / "subspaces" / "event0")),
        "subspaces-final": exert("analyze", "subspaces",
                                 *(str(runs / n / "event_adapters" / f"event-{last_event}") for n in names),
                                 "--names", ",".join(names), "--out", str(out / "subspaces" / "final")),
    }  # fmt: skip
    data = [a for name, config in DATA.items() for a in ("--data", f"{name}={config}")]
    common = ["--deepspeed", str(args.deepspeed), "--dtype", args.dtype, "--num-samples", str(args.energy_samples),
              "--seq-len", str(args.energy_seq_len), "--micro-batch", "16"]  # fmt: skip
    for seed in (0, 1):
        jobs[f"energy-base-seed{seed}"] = exert("analyze", "energy", "--model", str(base), *data, *common,
                                                "--seed", str(seed), "--out", str(out / "energy" / f"base-seed{seed}"))  # fmt: skip
    for run in ("health-s0", "health-s1", "legal-s0"):
        two = ["--data", f"health={DATA['health']}", "--data", f"legal={DATA['legal']}"]
        jobs[f"energy-{run}"] = exert("analyze", "energy", "--model", str(runs / run / "expert"), *two, *common,
                                      "--out", str(out / "energy" / run))  # fmt: skip
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs to share among the jobs (0: CPU)")
    parser.add_argument("--deadline-s", type=float, default=540, help="kill what still runs after this")
    parser.add_argument("--analysis-s", type=float, default=150, help="of the deadline, kept for the analyses")
    parser.add_argument("--skip-training", action="store_true", help="analyse the runs already under --runs")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the five runs go")
    parser.add_argument("--base", type=Path, default=BASE, help="the dense model (HF dir) the runs start from")
    parser.add_argument("--set", action="append", default=[], help="extra --set for every training (smoke tests)")
    parser.add_argument("--deepspeed", type=Path, default=DS_INFERENCE, help="ZeRO-3 config of the energy runs")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the energy runs")
    parser.add_argument("--energy-samples", type=int, default=64, help="calibration sequences per energy data set")
    parser.add_argument("--energy-seq-len", type=int, default=512, help="tokens per energy calibration sequence")
    args = parser.parse_args()
    t0 = time.monotonic()
    deadline = t0 + args.deadline_s
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    record: dict = {}
    if not args.skip_training:
        run_all(trainings(args.runs, args.set), args.gpus, logs, deadline - args.analysis_s, record)
    events = sorted(int(p.name.split("-")[1]) for p in (args.runs / "health-s0" / "event_adapters").glob("event-*"))
    run_all(analyses(args.out, events[-1] if events else 2, args), args.gpus, logs, deadline, record)
    import torch
    import transformers

    raw = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": args.gpus,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "seconds": round(time.monotonic() - t0, 1),
        "trainings": {n: {"config": str(c.relative_to(REPO)), "seed": s} for n, (c, s) in TRAININGS.items()},
        "pairings": PAIRINGS,
        "jobs": record,
        "summaries": {n: json.loads((args.runs / n / "summary.json").read_text()) for n in TRAININGS
                      if (args.runs / n / "summary.json").is_file()},
    }  # fmt: skip
    (args.out / "analysis_raw.json").write_text(json.dumps(raw, indent=1))
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    print(f"done in {raw['seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
