"""Turn the JSON of eval/bench_scale.py and eval/bench_70b_blocks.py runs into eval/results/perf.md.

Every number in the tables is read from the JSON files named on the command line (a run cut short by its
timeout shows what it measured and blanks for the rest); the ratios are computed here, the extrapolation
of the 70B section is a formula over measured numbers and says so.

Usage: python eval/perf_table.py --out eval/results/perf.md RUN.json [RUN.json ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path
from typing import Any

TARGETS = "targets (issue 8): schedule ≤5% wall-clock and ≤2% peak memory over plain LoRA; event ≤2× forward; ≥40% MFU; 1→2 GPU ≥1.9×"


def load(path: str) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    doc["file"] = path
    return doc


def phases(doc: dict[str, Any], phase: str) -> list[dict[str, Any]]:
    return [m for m in doc["measurements"] if m.get("phase") == phase]


def first(doc: dict[str, Any], phase: str, **match: Any) -> dict[str, Any] | None:
    for m in phases(doc, phase):
        if all(m.get(k) == v for k, v in match.items()):
            return m
    return None


def name(doc: dict[str, Any]) -> str:
    args = doc["meta"]["args"]
    model = Path(args["config_dir"]).name
    layers = f", {args['layers']} blocks" if args.get("layers") else ""
    label = f", {args['label']}" if args.get("label") else ""
    unit = "CPU ranks" if doc["meta"]["device"].startswith("CPU") else "GPU"
    return f"{model}{layers}, {doc['meta']['world_size']} {unit}{label} ({run_time(doc)})"


def started(doc: dict[str, Any]) -> datetime.datetime:
    return datetime.datetime.fromisoformat(doc["meta"]["date"])


def run_time(doc: dict[str, Any]) -> str:
    """The run's start as 'YYYY-MM-DD HH:MM' (UTC): tells apart runs of one model on one world size."""
    return doc["meta"]["date"][:16].replace("T", " ")


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def peak(m: dict[str, Any] | None, key: str = "peak_allocated_gib") -> float | None:
    return max(m[key]) if m and m.get(key) else None


def plain_table(docs: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| run | variant | grad. ckpt | micro-batch × seq | s/step (median) | tokens/s/GPU | tokens/s total | MFU (4N) "
        "| HFU | peak alloc. GiB (max rank) | host peak RSS GiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for doc in docs:
        for m in phases(doc, "plain"):
            rows.append(
                f"| {name(doc)} | {m['variant']} | {'yes' if m['gradient_checkpointing'] else 'no'} "
                f"| {m['micro_batch']} × {m['seq']} | {fmt(m['median_step_s'], 3)} | {fmt(m['tokens_per_s_per_gpu'], 0)} "
                f"| {fmt(m['tokens_per_s_total'], 0)} | {pct(m.get('mfu'))} | {pct(m.get('hfu'))} "
                f"| {fmt(peak(m))} | {fmt(peak(m, 'host_peak_rss_gib'))} |"
            )
    return rows


def schedule_table(docs: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| run | K (event every K steps) | plain s/step | schedule: steps s/step | amortised s/step (events "
        "included) | wall-clock ratio | event seconds | overhead at K=100 / K=1000 | peak alloc. plain → schedule "
        "GiB | memory ratio | peak first reached by |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for doc in docs:
        plain, sched = first(doc, "plain", variant="primary"), first(doc, "schedule")
        if not sched:
            continue
        base = plain["median_step_s"] if plain else None
        events = sched["event_seconds"]
        event = statistics.median(events) if events else None
        projected = [ratio(event, k * base) if event and base else None for k in (100, 1000)]
        rows.append(
            f"| {name(doc)} | {sched['event_every']} | {fmt(base, 3)} | {fmt(sched['median_step_s'], 3)} "
            f"| {fmt(sched['amortised_step_s'], 3)} | {fmt(ratio(sched['amortised_step_s'], base), 3)}× "
            f"| {', '.join(fmt(e, 1) for e in events)} | {' / '.join(pct(p) for p in projected)} "
            f"| {fmt(peak(plain))} → {fmt(peak(sched))} | {fmt(ratio(peak(sched), peak(plain)), 3)}× "
            f"| {peak_reached_by(sched)} |"
        )
    return rows


def peak_reached_by(sched: dict[str, Any]) -> str:
    """The step or event of the schedule phase by whose end its peak had first been reached (runs that record the
    peak so far after each step and event)."""
    final = peak(sched)
    reached = [m["after"] for m in sched.get("peak_so_far", []) if max(m["peak_allocated_gib"]) >= (final or 0) - 1e-6]
    return reached[0] if final is not None and reached else "–"


def event_table(docs: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| run | calibration tokens (total / per rank) | forward s | event s (each) | event / forward "
        "| slowest block s | PBS error reduction (mean over roles, first event) |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for doc in docs:
        fwd, sched = first(doc, "forward"), first(doc, "schedule")
        if not fwd:
            continue
        events = sched["events"] if sched else []
        seconds = [e["seconds"] for e in events]
        reduction = events[0]["pbs_error_reduction"] if events else {}
        rows.append(
            f"| {name(doc)} | {fwd['calibration_tokens_total']:,} / {fwd['calibration_tokens_per_rank']:,} "
            f"| {fmt(fwd['seconds'], 2)} | {', '.join(fmt(s, 1) for s in seconds) or '–'} "
            f"| {fmt(ratio(statistics.median(seconds), fwd['seconds']) if seconds else None, 1)}× "
            f"| {fmt(max(max(e['block_seconds']) for e in events) if events else None, 2)} "
            f"| {pct(statistics.mean(reduction.values()) if reduction else None)} |"
        )
    return rows


def tf32_event_lines(docs: list[dict[str, Any]]) -> list[str]:
    """The event with TF32 PBS products beside the schedule's last event (float32 products), same run."""
    out = []
    for doc in docs:
        tf32, sched = first(doc, "event_tf32"), first(doc, "schedule")
        if not (tf32 and sched and sched["events"]):
            continue
        fp32 = sched["events"][-1]
        reduction = {p: statistics.mean(e["pbs_error_reduction"].values()) for p, e in (("fp32", fp32), ("tf32", tf32))}
        out.append(
            f"- {name(doc)}: event with float32 PBS products {fmt(fp32['seconds'], 1)} s, with TF32 "
            f"(`pbs.matmul_precision: high`) {fmt(tf32['seconds'], 1)} s: {fmt(ratio(fp32['seconds'], tf32['seconds']), 2)}× "
            f"faster; PBS error reduction {pct(reduction['fp32'])} vs {pct(reduction['tf32'])}"
        )
    return out


def scaling_table(docs: list[dict[str, Any]]) -> list[str]:
    """One row per plain variant of each 2-GPU run of a whole model, against the same variant of the 1-GPU run of
    that model with the same DeepSpeed config that started closest in time: runs of one lease, where both ran in
    one (step times differ between machines of one kind by more than the margin of the 1.9× target)."""
    whole = [d for d in docs if not d["meta"]["args"].get("layers") and first(d, "plain")]
    model = {id(d): Path(d["meta"]["args"]["config_dir"]).name for d in whole}
    rows = [
        "| 2-GPU run | variant | tokens/s 1 GPU | tokens/s 2 GPUs (total) | scaling 1→2 | 1-GPU run (UTC) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for doc in (d for d in whole if d["meta"]["world_size"] == 2):
        ones = [d for d in whole if d["meta"]["world_size"] == 1 and model[id(d)] == model[id(doc)]]
        one_doc = min(
            ones,
            key=lambda d: (ds_config_file(d) != ds_config_file(doc), abs(started(d) - started(doc))),
            default=None,
        )
        for two in phases(doc, "plain"):
            one = first(one_doc, "plain", variant=two["variant"]) if one_doc else None
            rows.append(
                f"| {name(doc)} | {two['variant']} | {fmt(one['tokens_per_s_total'] if one else None, 0)} "
                f"| {fmt(two['tokens_per_s_total'], 0)} "
                f"| {fmt(ratio(two['tokens_per_s_total'], one['tokens_per_s_total']) if one else None, 2)}× "
                f"| {run_time(one_doc) if one else '–'} |"
            )
    return rows


def ds_config_file(doc: dict[str, Any]) -> str | None:
    return doc["meta"]["args"].get("ds_config")


def collectives_section(docs: list[dict[str, Any]]) -> list[str]:
    """Collective calls of one event per run (bench_scale --count-collectives), one column per c10d op."""
    runs = [(doc, m) for doc in docs for m in phases(doc, "collectives")]
    ops = sorted({op for _, m in runs for op in m["calls"]})
    if not runs:
        return []
    rows = ["| run | " + " | ".join(f"`{op}`" for op in ops) + " |", "|---|" + "---:|" * len(ops)]
    for doc, m in runs:
        rows.append(f"| {name(doc)} | " + " | ".join(str(m["calls"].get(op, 0)) for op in ops) + " |")
    return rows


def memory_trace_section(docs: list[dict[str, Any]], sites: int = 6) -> list[str]:
    """The allocator trace of one event (bench_scale --memory-trace): its peak against plain training's, and the
    allocation sites live at the peak."""
    out = []
    for doc in docs:
        trace, plain = first(doc, "memory_trace"), first(doc, "plain", variant="primary")
        if not trace:
            continue
        out.append(
            f"- {name(doc)}: allocated {fmt(trace['allocated_at_start_gib'])} GiB before the event, event peak "
            f"{fmt(max(trace['peak_allocated_gib']))} GiB (plain training: {fmt(peak(plain))} GiB); at the peak, "
            f"{fmt(trace['live_at_peak_from_this_call_gib'])} GiB were allocated by the event itself, in:"
        )
        out += [
            f"  - {fmt(site['gib'])} GiB in {site['count']} allocations: `{site['site']}`"
            for site in trace["top_sites_at_peak"][:sites]
        ]
    return out


def profile_section(docs: list[dict[str, Any]], rows: int = 12) -> list[str]:
    out = []
    for doc in docs:
        for m in phases(doc, "profile"):
            for key, table in m["tables"].items():
                lines = table.splitlines()
                totals = [line for line in lines if " time total: " in line]  # what the percentages are of
                out += [f"**{name(doc)}: {m['what']}, top ops {key.replace('_', ' ')}**", "", "```"]
                out += lines[: rows + 3] + totals + ["```", ""]
    return out


def hessian_section(docs: list[dict[str, Any]]) -> list[str]:
    out = []
    for doc in docs:
        for m in phases(doc, "hessian_matmul"):
            for s in m["shapes"]:
                cells = []
                for key in ("fp32", "bf16_in_fp32_out"):
                    v = s.get(key, {})
                    cells.append(
                        f"{key}: {fmt(v['seconds'] * 1e3, 2)} ms (max rel. diff {v['max_rel_diff']:.1e})"
                        if "seconds" in v
                        else f"{key}: {v.get('error', '–')}"
                    )
                out.append(f"- {name(doc)}: XᵀX of {s['rows']}×{s['width']}: " + "; ".join(cells))
    return out


def pbs_precision_section(docs: list[dict[str, Any]]) -> list[str]:
    out = []
    for doc in docs:
        for m in phases(doc, "pbs_precision"):
            for s in m["shapes"]:
                fp32, tf32 = s["highest"], s["high"]
                out.append(
                    f"- {name(doc)}: PBS on {s['shape'][0]}×{s['shape'][1]} (H from {s['tokens']:,} tokens): float32 "
                    f"{fmt(fp32['seconds'] * 1e3, 1)} ms vs TF32 {fmt(tf32['seconds'] * 1e3, 1)} ms; error reduction "
                    f"{pct(fp32['error_reduction'])} vs {pct(tf32['error_reduction'])}; ΔB rel. diff {s['delta_b_rel_diff']:.1e}"
                )
    return out


def seventy_b_section(doc: dict[str, Any]) -> list[str]:
    meta, target = doc["meta"], doc["meta"].get("extrapolation_target", {})
    args = meta["args"]
    plain, fwd, event = first(doc, "plain"), first(doc, "block_forward"), first(doc, "event")
    out = [
        f"Run: {name(doc)}; calibration {args['calib_samples']} × {args['calib_seq']}; "
        f"micro-batch {args['micro_batch']} × seq {args['seq']}; `{meta['command']}`",
        "",
        "| measured | value |",
        "|---|---|",
    ]
    if plain:
        out.append(f"| training step (median of {len(plain['step_seconds'])}) | {fmt(plain['median_step_s'], 3)} s |")
        out.append(
            f"| peak GPU memory per rank, training | {', '.join(fmt(x) for x in plain['peak_allocated_gib'])} GiB |"
        )
    if fwd:
        out.append(
            f"| block forward over the calibration share, per block | {', '.join(fmt(x, 3) for x in fwd['block_seconds'])} s |"
        )
    if event:
        out += [
            f"| prune event (PBS {args['pbs']}, {args['sparsity']:.0%}) | {fmt(event['seconds'], 2)} s |",
            f"| event seconds per block | {', '.join(fmt(x, 2) for x in event['block_seconds'])} |",
            f"| measured sparsity per role | {', '.join(f'{k} {v:.4f}' for k, v in event['sparsity'].items())} |",
            f"| peak GPU memory per rank, event | {', '.join(fmt(x) for x in event['peak_allocated_gib'])} GiB |",
            f"| peak host RSS per rank, event | {', '.join(fmt(x) for x in event['host_peak_rss_gib'])} GiB |",
        ]
    if not (fwd and event and target):
        return out + ["", "Extrapolation: not computed (the run did not reach the event)."]
    steady = slice(1, None) if len(event["block_seconds"]) > 1 else slice(None)  # block 0 pays first-call costs
    t_block = statistics.median(event["block_seconds"][steady])
    t_fwd = statistics.median(fwd["block_seconds"][steady])
    rest = max(t_block - 2 * t_fwd, 0.0)
    world, blocks, gpus = meta["world_size"], target["blocks"], target["gpus"]
    cal_ratio = target["calib_samples"] / args["calib_samples"]
    ideal = blocks * (2 * t_fwd * cal_ratio + rest) * world / gpus
    flat = blocks * (2 * t_fwd * cal_ratio * world / gpus + rest)
    out += [
        "",
        f"**Extrapolation (not a measurement)** to {blocks} blocks on {gpus} GPUs with {target['calib_samples']} × "
        f"{target['calib_seq']} calibration tokens, from the steady blocks above (block 0 left out when there are others): "
        f"t_block = {t_block:.2f} s per block on {world} GPUs, of which t_tok = 2 × t_fwd = {2 * t_fwd:.2f} s is the two "
        f"passes over the calibration share (statistics, propagation) and t_row = {rest:.2f} s the rest (scores, PBS, "
        f"writes, H accumulation). t_tok scales with calibration tokens per rank, t_row with rows per rank (PBS rows "
        "are split by owner).",
        "",
        f"- both parts shrink as 1/GPUs: T ≈ {blocks} × (t_tok × {cal_ratio:g} + t_row) × {world}/{gpus} = **{ideal / 60:.1f} min**",
        f"- only t_tok shrinks (t_row not parallel): T ≈ {blocks} × (t_tok × {cal_ratio:g} × {world}/{gpus} + t_row) = "
        f"**{flat / 60:.1f} min**",
        "- not modelled: communication growth with 8 ranks, the H accumulation's growth with calibration tokens "
        "(counted in t_row, so the first line is a lower bound), memory.",
    ]
    return out


def environment_lines(docs: list[dict[str, Any]]) -> list[str]:
    out = []
    for doc in docs:
        meta = doc["meta"]
        versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        out.append(f"- {name(doc)}: {meta['date']}; {meta['device']}; {versions}; file `{doc['file']}`")
        out.append(f"  command: `{meta['command']}`")
    return out


def render(docs: list[dict[str, Any]]) -> str:
    scale = [d for d in docs if "extrapolation_target" not in d["meta"]]
    seventy = [d for d in docs if "extrapolation_target" in d["meta"]]
    conv = next((d["meta"]["flops_convention"] for d in scale), None)
    lines = ["# Performance: the EfficientXpert trainer on ZeRO-3 vs plain LoRA in the same engine", ""]
    lines += ["Runs (raw JSON beside this file):", ""] + environment_lines(docs) + [""]
    if conv:
        lines += [
            f"FLOPs convention: N = {conv['N_matmul_params']:,} base linear weights (first run's model); MFU counts "
            f"{conv['mfu']}; HFU counts {conv['hfu']}; not counted: {conv['not_counted']}. Peak: {conv['peak']}.",
            "",
            TARGETS,
            "",
        ]
    if scale:
        lines += ["## Plain LoRA steps (no events)", ""] + plain_table(scale) + [""]
        lines += ["## Schedule vs plain LoRA (same engine, same run)", ""] + schedule_table(scale)
        lines += [
            "",
            "Overhead at K = event s / (K × plain s/step): what the measured event costs when events are K steps apart "
            "(the paper's schedule prunes about once per epoch).",
            "",
        ]
        lines += ["## Prune event vs one forward pass over the same calibration tokens", ""] + event_table(scale)
        tf32 = tf32_event_lines(scale)
        if tf32:
            lines += [
                "",
                "Events with TF32 PBS products: one more event right after the schedule's last one, same run, model and "
                "calibration tokens. It also updates the EMA, which a first event does not, so the gain it shows is if "
                "anything understated; its error reduction is measured on weights the earlier event already pruned.",
                "",
            ] + tf32
        lines += ["", "## 1 → 2 GPUs", ""] + scaling_table(scale) + [""]
        hess = hessian_section(scale)
        if hess:
            lines += (
                [
                    "## H = XᵀX: upcast to float32 first vs bf16 inputs with a float32 result (the event's path on CUDA)",
                    "",
                ]
                + hess
                + [""]
            )
        pbs = pbs_precision_section(scale)
        if pbs:
            lines += (
                ["## PBS alone: float32 matmuls (the default) vs TF32 (`pbs.matmul_precision: high`)", ""] + pbs + [""]
            )
        counts = collectives_section(scale)
        if counts:
            lines += ["## Collective calls in one prune event (rank 0, torch.profiler's c10d ops)", ""] + counts + [""]
        traces = memory_trace_section(scale)
        if traces:
            lines += ["## What is live at a prune event's peak (allocator trace, rank 0)", ""] + traces + [""]
        prof = profile_section(scale)
        if prof:
            lines += ["## Profiles (torch.profiler)", ""] + prof
    for doc in seventy:
        lines += ["## LLaMA-3-70B shapes, truncated (issue 9, partial)", ""] + seventy_b_section(doc) + [""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="eval/results/perf.md")
    parser.add_argument("runs", nargs="+", help="JSON files written by bench_scale.py / bench_70b_blocks.py")
    parser.add_argument(
        "--analysis", default=None, help="a hand-written markdown reading of the runs, appended (eval/perf_analysis.md)"
    )
    args = parser.parse_args(argv)
    docs = []
    for path in args.runs:
        try:
            docs.append(load(path))
        except (OSError, json.JSONDecodeError) as err:
            print(f"perf_table: skipping {path}: {err}")
    text = render(docs)
    if args.analysis:
        text += "\n" + Path(args.analysis).read_text()
    Path(args.out).write_text(text)
    print(f"wrote {args.out} from {len(docs)} runs")


if __name__ == "__main__":
    main()
