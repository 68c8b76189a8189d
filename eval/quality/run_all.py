"""Run every cell of the quality table (issue 7) and collect the raw results in one JSON.

Per domain (health, legal) and sparsity (0.5, 0.4): dense LoRA; ForeSight + PBS (hessian); ForeSight + PBS
(reference); ForeSight alone; and the dense LoRA expert pruned one-shot by Wanda, SparseGPT and magnitude —
same data, steps and seed (health.yaml / legal.yaml, varied only by --set). Each job is one process
(`python -m exert_ds train|prune`, then `python -m exert_ds eval` on what it wrote); jobs share the GPUs,
several per GPU (a 135M model leaves an H200 mostly idle), in priority order, so that a deadline leaves a
coherent part of the table. Writes OUT/quality_raw.json (results, TensorBoard scalars of every event,
commands, seconds) and OUT/logs.tar.gz.

  python3 eval/quality/run_all.py --out $OUT --gpus 2 --per-gpu 4 --deadline-s 480 --seeds 0,1,2
then  python3 eval/quality/table.py $OUT/quality_raw.json   (writes eval/results/quality.md + quality.json)

--trace-events (issue 20.3: which step loses a skill): the trained methods also keep the model after each event
(train.save_event_experts) and each event's adapter (train.save_event_adapters), and every cell evaluates, besides
its final model, the model after event K (trace/after-K.json) and the one event K started from (event K−1's expert, or
the base model, with event K's adapter merged: trace/before-K.json); table.py tabulates them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO / ".stage" / "quality_data"
RUNS = REPO / "runs" / "quality"
sys.path.insert(0, str(REPO / "eval"))
from job_env import single_process_env  # noqa: E402

TASKS = {"health": "pubmedqa,medquad_qtype", "legal": "cuad,license_category"}
RECOVERY = "prune.recovery_steps=60"  # §8 c: one more epoch (60 steps in each domain) after the final mask
ONE_SHOT = {  # method name → the --set of the one-shot prune of the dense LoRA expert
    "lora_then_wanda": ["prune.scorer=wanda"],
    "lora_then_sparsegpt": ["prune.scorer=sparsegpt"],
    "lora_then_magnitude": ["prune.scorer=magnitude"],
    "lora_then_sparsegpt_recovery": ["prune.scorer=sparsegpt", RECOVERY],  # the same masked recovery as below
}
TRAINED = {  # method name → the --set that make it (on top of health.yaml / legal.yaml)
    "foresight_pbs_hessian": ["pbs.mode=hessian"],  # the paper's EfficientXpert settings
    "foresight_pbs_reference": ["pbs.mode=reference"],
    "foresight_alone": ["pbs.mode=off"],
    "foresight_pbs_obs_final": ["pbs.mode=hessian", "prune.reconstruct=obs", "pbs.at_final=true"],  # §8 a + b
    # issue 18.1; the float32 shadow only counts the mask entries it would set otherwise (training is unchanged)
    "foresight_pbs_hessian_ema_bf16": ["pbs.mode=hessian", "prune.ema_dtype=bfloat16", "prune.ema_shadow=true"],
    "foresight_pbs_obs_final_recovery": ["pbs.mode=hessian", "prune.reconstruct=obs", "pbs.at_final=true", RECOVERY],
    "foresight_pbs_hessian_owl": ["pbs.mode=hessian", "prune.allocation=owl"],  # §8 d on the paper's settings
}
DEFAULT_METHODS = ("dense_lora", *TRAINED, *ONE_SHOT)


@dataclass
class Job:
    """One cell: a training (or one-shot prune) run, then the evaluation of the model it wrote."""

    name: str
    domain: str
    method: str
    sparsity: float
    seed: int
    command: list[str]
    model_dir: Path
    needs: str | None = None
    trace: bool = False  # --trace-events: evaluate the model before and after every event too
    result: dict = field(default_factory=dict)


TRACE_SETS = ["train.save_event_experts=true", "train.save_event_adapters=true"]


def jobs_for(
    domain: str, seed: int, sparsities: list[float], methods: list[str], extra: list[str], trace: bool = False
) -> list[Job]:
    """The jobs of one domain and seed; names carry both (e.g. health-foresight_pbs_hessian-0.5-s1)."""
    config = str(HERE / f"{domain}.yaml")
    out: list[Job] = []

    def run(kind: str, name: str, sets: list[str]) -> list[str]:
        sets = [*sets, f"train.output_dir={RUNS / name}", f"train.seed={seed}", *extra]
        return [sys.executable, "-m", "exert_ds", kind, "--config", config, *(a for s in sets for a in ("--set", s))]

    dense = f"{domain}-dense_lora-s{seed}"
    out.append(Job(dense, domain, "dense_lora", 0.0, seed, run("train", dense, ["prune.enabled=false"]), RUNS / dense))
    for sparsity in sparsities:
        for method in (m for m in methods if m in TRAINED):
            name = f"{domain}-{method}-{sparsity}-s{seed}"
            sets = [f"prune.sparsity={sparsity}", *TRAINED[method], *(TRACE_SETS if trace else [])]
            out.append(Job(name, domain, method, sparsity, seed, run("train", name, sets), RUNS / name, trace=trace))
        for method in (m for m in methods if m in ONE_SHOT):
            name = f"{domain}-{method}-{sparsity}-s{seed}"
            sets = [
                f"model.name_or_path={RUNS / dense / 'final'}",
                *ONE_SHOT[method],
                f"prune.sparsity={sparsity}",
                "pbs.mode=off",
            ]
            out.append(Job(name, domain, method, sparsity, seed, run("prune", name, sets), RUNS / name, dense))
    return out


def eval_command(job: Job, args: argparse.Namespace, model: str | None = None, out: str | None = None) -> list[str]:
    """The evaluation of the job's final model (or of `model` into `out`: the event trace, whose experts carry their
    own promise and whose merged adapters have none)."""
    held = DATA / "heldout"
    command = [
        sys.executable, "-m", "exert_ds", "eval",
        "--model", model or str(job.model_dir / ("expert" if owl(job.method) else "final")),
        "--tasks", TASKS[job.domain], "--data-dir", str(DATA / "eval"),
        "--perplexity", f"{job.domain}={held / f'{job.domain}.jsonl.gz'}",
        "--perplexity", f"general={held / 'general.jsonl.gz'}",
        "--max-examples", str(args.max_examples), "--max-length", "512", "--micro-batch", str(args.eval_batch),
        "--window", "512", "--max-windows", str(args.max_windows), "--dtype", "bfloat16",
        "--out", out or str(job.model_dir / "eval.json"), "--save-scores",
    ]  # fmt: skip
    if job.domain == "legal":
        command += ["--task-data", f"license_category={DATA / 'eval' / 'licenses'}"]
    if job.sparsity and model is None and not owl(job.method):  # an OWL expert promises per block: its manifest
        command += ["--expect-sparsity", str(job.sparsity)]
    return command


def owl(method: str) -> bool:
    """Whether the method allocates the sparsity over blocks (prune.allocation owl): its model is evaluated as the
    sparse expert, whose manifest promises each block's own sparsity."""
    return "prune.allocation=owl" in TRAINED.get(method, ONE_SHOT.get(method, []))


def base_model(domain: str, sets: list[str]) -> Path:
    """The model the domain's YAML trains from (its path is relative to the YAML), or the last --set
    model.name_or_path= among `sets`."""
    import yaml

    override = [item.split("=", 1)[1] for item in sets if item.startswith("model.name_or_path=")]
    if override:
        return Path(override[-1]).resolve()
    return (HERE / yaml.safe_load((HERE / f"{domain}.yaml").read_text())["model"]["name_or_path"]).resolve()


def trace_script(job: Job, args: argparse.Namespace) -> str:
    """bash, run after the cell's own evaluation: for every event K the run kept, evaluate event_experts/event-K into
    trace/after-K.json, and event K−1's expert (the base model for K = 0) with event_adapters/event-K merged
    (`--adapter`) into trace/before-K.json. A failure leaves trace/FAILED and the cell's own result stands."""
    folders = {v: shlex.quote(str(job.model_dir / d)) for v, d in (("E", "event_experts"), ("A", "event_adapters"))}
    folders |= {"T": shlex.quote(str(job.model_dir / "trace")), "B": shlex.quote(str(base_model(job.domain, args.set)))}

    def run(model: str, out: str, adapter: str | None = None) -> str:  # shell expressions, expanded in double quotes
        line = shlex.join([*eval_command(job, args, "@MODEL@", "@OUT@"), *(["--adapter", "@ADAPTER@"] if adapter else [])])
        return line.replace("@MODEL@", f'"{model}"').replace("@OUT@", f'"{out}"').replace("@ADAPTER@", f'"{adapter}"')

    loop = (
        'mkdir -p "$T" && for k in $(ls "$E" | sed "s/event-//" | sort -n); do '
        f"{run('$E/event-$k', '$T/after-$k.json')} && "
        'if [ "$k" -eq 0 ]; then prev="$B"; else prev="$E/event-$((k-1))"; fi && '
        f"{run('$prev', '$T/before-$k.json', '$A/event-$k')} || exit 1; done"
    )
    assign = " ".join(f"{v}={q};" for v, q in folders.items())
    return f'{{ ( {assign} {loop} ) || touch {folders["T"]}/FAILED; }}'


def event_scalars(run_dir: Path) -> dict[str, list[list[float]]]:
    """TensorBoard scalars of the prune events (tag → [[step, value], ...]): PBS error reduction, mask change."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = run_dir / "tensorboard"
    if not board.is_dir():
        return {}
    acc = EventAccumulator(str(board))
    acc.Reload()
    wanted = (
        "pbs_error_reduction/", "obs_error_reduction/", "mask_change/", "ema_shadow_differs/", "event/", "sparsity/",
        "train/loss",
    )  # fmt: skip
    return {
        tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith(wanted)
    }


def run_job(job: Job, slot: int, args: argparse.Namespace, logs: Path) -> subprocess.Popen:
    """Train/prune, then evaluate, in one shell so the slot is held until both are done."""
    script = " && ".join(" ".join(f"'{a}'" for a in command) for command in (job.command, eval_command(job, args)))
    if job.trace:
        script += " && " + trace_script(job, args)
    log = (logs / f"{job.name}.log").open("w")
    return subprocess.Popen(["bash", "-c", script], cwd=REPO, env=single_process_env(slot, args.gpus, args.threads, 29600), stdout=log, stderr=log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs to share among the jobs (0: CPU ranks)")
    parser.add_argument("--per-gpu", type=int, default=4, help="jobs at once per GPU (or in all, on CPU)")
    parser.add_argument("--deadline-s", type=float, default=480, help="kill what still runs after this")
    parser.add_argument("--domains", default="health,legal")
    parser.add_argument("--only", default="", help="comma-separated job names (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated METHOD@SPARSITY cells not to run (e.g. done earlier)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, all run in this one call (e.g. 0,1,2)")
    parser.add_argument("--sparsities", default="0.5,0.4", help="comma-separated target sparsities")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated method names")
    parser.add_argument("--max-examples", type=int, default=500)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], help="extra --set for every run (smoke tests)")
    parser.add_argument("--trace-events", action="store_true", help="also evaluate before and after every event")
    args = parser.parse_args()
    started = time.monotonic()
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(DEFAULT_METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {', '.join(DEFAULT_METHODS)}")
    queue = [
        j
        for s in seeds
        for d in args.domains.split(",")
        for j in jobs_for(d, s, sparsities, methods, args.set, args.trace_events)
    ]
    skip = {(m, float(p)) for m, _, p in (c.partition("@") for c in args.skip.split(",") if c)}
    queue = [j for j in queue if (j.method, j.sparsity) not in skip]
    if args.only:
        queue = [j for j in queue if j.name in args.only.split(",")]
        for job in queue:  # a dependency left out of --only is satisfied by its earlier output
            if job.needs not in {j.name for j in queue} and (RUNS / str(job.needs) / "final").is_dir():
                job.needs = None
    # priority: dense LoRA, then --methods in the order given, each at --sparsities in the order given (a one-shot
    # cell waits for its dense LoRA and leaves its slot to the next cell that can start)
    order = {**{m: i for i, m in enumerate(methods)}, "dense_lora": -1}
    queue.sort(key=lambda j: (order[j.method], j.sparsity not in (0.0, sparsities[0]), j.seed))
    slots = max(1, args.gpus) * args.per_gpu
    running: dict[int, tuple[Job, subprocess.Popen, float]] = {}
    done: dict[str, Job] = {}
    while queue or running:
        for slot, (job, proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[slot]
            job.result = {"returncode": proc.returncode, "seconds": round(time.monotonic() - t0, 1)}
            collect(job)
            done[job.name] = job
            print(f"[{time.monotonic() - started:6.0f}s] {job.name}: rc={proc.returncode}", flush=True)
            write_raw(args, done, logs, time.monotonic() - started)  # every finished cell is kept, whatever follows
        if time.monotonic() - started > args.deadline_s:
            for job, proc, _ in running.values():
                proc.kill()
                job.result = {"returncode": "killed at the deadline"}
                collect(job, killed=True)
                done[job.name] = job
            running.clear()
            break
        free = [s for s in range(slots) if s not in running]
        for job in list(queue):
            if not free:
                break
            if job.needs and job.needs not in done:
                continue
            queue.remove(job)
            if job.needs and done[job.needs].result.get("returncode") != 0:
                job.result = {"returncode": f"skipped: {job.needs} failed"}
                done[job.name] = job
                continue
            slot = free.pop(0)
            running[slot] = (job, run_job(job, slot, args, logs), time.monotonic())
        time.sleep(1)
    for job in queue:
        done[job.name] = job
        job.result = {"returncode": "not started before the deadline"}
    write_raw(args, done, logs, time.monotonic() - started)


def collect(job: Job, killed: bool = False) -> None:
    """Add a finished job's evaluation and event scalars to its result (once, when it ends). A traced cell killed at
    the deadline keeps its own evaluation when that had been written (the trace runs after it)."""
    evaluation = job.model_dir / "eval.json"
    if (job.result.get("returncode") == 0 or (killed and job.trace)) and evaluation.is_file():
        try:
            job.result["eval"] = json.loads(evaluation.read_text())
        except json.JSONDecodeError:  # killed while writing it
            return
        job.result["events"] = event_scalars(job.model_dir)
        if job.trace:  # stage (after-K, before-K) → tasks (predictions kept, log-likelihoods dropped) and perplexity
            trace = job.model_dir / "trace"
            job.result["trace"] = {p.stem: entry for p in sorted(trace.glob("*.json")) if (entry := trace_entry(p))}
            job.result["trace_complete"] = not (trace / "FAILED").exists() and not killed


def trace_entry(path: Path) -> dict | None:
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:  # killed while writing it
        return None
    tasks = {t: {k: v for k, v in r.items() if k != "loglik"} for t, r in result["tasks"].items()}
    return {"tasks": tasks, "perplexity": result["perplexity"]}


def write_raw(args: argparse.Namespace, done: dict[str, Job], logs: Path, seconds: float) -> None:
    import torch
    import transformers

    cells = {}
    for name, job in done.items():
        result = {**job.result, "domain": job.domain, "method": job.method, "sparsity": job.sparsity}
        cells[name] = {**result, "seed": job.seed, "command": job.command}
    raw = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": args.gpus,
        "jobs_per_gpu": args.per_gpu,
        "seconds": round(seconds, 1),
        "seeds": [int(s) for s in args.seeds.split(",")],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "cells": cells,
    }
    (args.out / "quality_raw.json").write_text(json.dumps(raw, indent=1))
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    ok = sum(1 for c in cells.values() if "eval" in c)
    print(f"{ok}/{len(cells)} cells evaluated in {seconds:.0f}s -> {args.out / 'quality_raw.json'}")


if __name__ == "__main__":
    main()
