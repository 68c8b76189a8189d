"""Issue 19's tables: exert_ds's training step (eval/bench_scale.py) against the plain-PyTorch anchor
(eval/plain_lora_anchor.py), as ratios taken only within one lease, plus eval/results/perf_summary.json.

Each lease is `NAME=DIR[,DIR...]`: the folders of its device calls (eval/gpu_step_anchor.sh's $OUT). Every
bench_scale JSON is labelled by the levers it ran with (read from its recorded DeepSpeed config and arguments), and
each of its plain settings is divided by the anchor's same setting of the same shape in the same lease.

  python3 eval/step_anchor_table.py L1=eval/results/perf/2026-12-01/call1,eval/results/perf/2026-12-01/call2 ... \\
      --summary-lease L4 --summary-levers "granularity 1e+08 + F.linear + adapters in the model's dtype" \\
      --out eval/results/perf_anchor.md --summary eval/results/perf_summary.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SETTINGS = {("nockpt:8", False, 8): "mb8_norecompute", ("primary", True, 4): "mb4_recompute"}
ANCHOR_SETTING = {"8:0": "mb8_norecompute", "4:1": "mb4_recompute"}


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted, or — where it was not measured (CPU runs have no peak memory or MFU)."""
    return "—" if value is None else format(value, spec)


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def shape_of(config_dir: str) -> str:
    """"7b" / "8b" for eval/configs/llama2_7b_shape / llama3_8b_shape, else the config folder's name."""
    name = Path(config_dir.rstrip("/")).name
    return "8b" if "8b" in name else "7b" if "7b" in name else name


def full_depth(config_dir: str) -> int | None:
    """num_hidden_layers of the config folder (relative to the repository when not found as given)."""
    for folder in (Path(config_dir), REPO / config_dir):
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    return None


def levers(meta: dict) -> str:
    """What the run changed against the 2026-11-30 default: the zero_optimization keys, adapter dtype, liger."""
    zero, args = meta["ds_config"]["zero_optimization"], meta.get("args", {})
    out = []
    if zero.get("stage3_module_granularity_threshold"):
        out.append(f"granularity {zero['stage3_module_granularity_threshold']:.0e}")
    if zero.get("memory_efficient_linear") is False:
        out.append("F.linear")
    if zero.get("stage3_param_persistence_threshold", 0) >= 1e9:
        out.append("all persistent")
    out.append("adapters in the model's dtype" if args.get("adapter_dtype", "float32") == "model" else "fp32 adapters")
    if args.get("liger"):
        out.append("liger")
    if args.get("deepcompile"):
        out.append("deepcompile")
    if args.get("layers"):
        out.append(f"{args['layers']} blocks")
    return " + ".join(out)


def read_lease(dirs: list[Path]) -> tuple[dict, list[dict]]:
    """(anchor figures by (shape, setting, liger, compile), exert_ds plain records with labels)."""
    anchors: dict = {}
    runs: list[dict] = []
    for folder in dirs:
        for path in sorted(folder.glob("anchor_*.json")):
            doc = json.loads(path.read_text())
            meta = doc["meta"]
            if meta["layers"] != full_depth(meta["config_dir"]):
                continue  # a cut model (--layers): compared with nothing
            shape = shape_of(meta["config_dir"])
            for r in doc["results"]:
                key = (shape, ANCHOR_SETTING[r["variant"]], bool(meta.get("liger")), r["compile"])
                anchors[key] = {**r, "file": str(path), "date": meta["date"], "calib_forward": meta.get("calib_forward")}
        for path in sorted(folder.glob("*.json")):
            if path.name.startswith("anchor_"):
                continue
            doc = json.loads(path.read_text())
            if "measurements" not in doc or "ds_config" not in doc.get("meta", {}):
                continue
            meta = doc["meta"]
            for m in doc["measurements"]:
                if m["phase"] != "plain":
                    continue
                setting = SETTINGS.get((m["variant"], m["gradient_checkpointing"], m["micro_batch"]))
                if setting is None:
                    continue
                runs.append({
                    "file": str(path), "shape": shape_of(meta["args"]["config_dir"]), "setting": setting,
                    "levers": levers(meta), "liger": bool(meta.get("args", {}).get("liger")),
                    "blocks": meta.get("args", {}).get("layers"), "step_s": m["median_step_s"],
                    "peak_gib": max(m["peak_allocated_gib"]) if m.get("peak_allocated_gib") else None, "mfu": m["mfu"], "date": meta["date"],
                    "command": meta["command"],
                })  # fmt: skip
    return anchors, runs


def event_rows(dirs: list[Path], anchors: dict) -> list[dict]:
    """Each prune event of a bench_scale run with events (`schedule` and `event_tf32` phases), against the anchor's
    no-grad forward over the same number of calibration tokens in the same lease."""
    forward = {shape: a["calib_forward"] for (shape, _, liger, c), a in anchors.items() if a["calib_forward"] and not liger}
    rows = []
    for folder in dirs:
        for path in sorted(folder.glob("*.json")):
            doc = json.loads(path.read_text())
            phases = {m["phase"]: m for m in doc.get("measurements", [])}
            if "schedule" not in phases or "ds_config" not in doc.get("meta", {}):
                continue
            shape = shape_of(doc["meta"]["args"]["config_dir"])
            ref = forward.get(shape)
            tokens = phases["forward"]["calibration_tokens_per_rank"]
            if not ref or ref["samples"] * ref["seq"] != tokens:
                continue
            events = [(f"event {e['event']} (PBS float32 products)", e["seconds"]) for e in phases["schedule"]["events"]]
            if "event_tf32" in phases:
                events.append(("event with TF32 PBS products", phases["event_tf32"]["seconds"]))
            events.append(("the engine's own calibration forward", phases["forward"]["seconds"]))
            rows += [{"shape": shape, "what": what, "seconds": sec, "anchor_forward_s": ref["seconds"],
                      "tokens": tokens, "levers": levers(doc["meta"]), "file": str(path)} for what, sec in events]  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lease", nargs="+", help="NAME=DIR[,DIR...]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("--summary-lease", required=True, help="LEASE[,LEASE...]: per shape, the first that measured it")
    parser.add_argument("--summary-levers", required=True, help="the levers label of the runs the summary reports")
    parser.add_argument("--summary-note", default="")
    parser.add_argument("--analysis", type=Path, default=None, help="a hand-written reading appended to --out")
    parser.add_argument("--summary-date", required=True)
    parser.add_argument("--summary-extra", default="{}", help="JSON merged into each shape's entry (unmeasured keys)")
    args = parser.parse_args(argv)
    lines = [
        "# Training step against plain PyTorch on the same GPU (issue 19)",
        "",
        "Ratios = exert_ds's median step (eval/bench_scale.py, the trainer's ZeRO-3 engine, 1 GPU) / the anchor's "
        "(eval/plain_lora_anchor.py: PEFT LoRA, no DeepSpeed, eager unless noted) at the same setting, both measured "
        "in the same lease (step times move up to 1.5× between leases). Peak = torch's max allocated GiB. MFU counts "
        "4N FLOPs per token (eval/perf.md).",
        "",
    ]
    summary: dict = {}
    preferred = args.summary_lease.split(",")  # per shape, the first of these leases that measured it
    candidates: dict[tuple[str, str], dict] = {}
    for spec in args.lease:
        name, _, dirs = spec.partition("=")
        anchors, runs = read_lease([Path(d) for d in dirs.split(",")])
        if not runs and not anchors:
            continue
        dates = sorted({r["date"] for r in runs} | {a["date"] for a in anchors.values()})
        lines += [f"## Lease {name} ({dates[0]} – {dates[-1]}), folders {dirs}", ""]
        lines += ["| shape | anchor | setting | s/step | peak GiB | MFU (4N) |", "|---|---|---|---:|---:|---:|"]
        for (shape, setting, liger, compiled), a in sorted(anchors.items()):
            label = ("liger" if liger else "eager") + ("" if compiled == "none" else f", compile {compiled}")
            lines.append(f"| {shape} | {label} | {setting} | {a['s_per_step_median']:.3f} | "
                         f"{fmt(a['peak_alloc_gib'], '.1f')} | {fmt(a['mfu_4N'], '.1%')} |")  # fmt: skip
        lines += ["", "| shape | exert_ds levers | setting | s/step | × anchor step | peak GiB | × anchor peak | MFU | file |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in sorted(runs, key=lambda r: (r["shape"], r["levers"], r["setting"])):
            a = anchors.get((r["shape"], r["setting"], r["liger"], "none")) if not r["blocks"] else None
            step = ratio(r["step_s"], a and a["s_per_step_median"])
            mem = ratio(r["peak_gib"], a and a["peak_alloc_gib"])
            lines.append(f"| {r['shape']} | {r['levers']} | {r['setting']} | {r['step_s']:.3f} | {fmt(step, '.2f')}{'×' if step else ''} | "
                         f"{fmt(r['peak_gib'], '.1f')} | {fmt(mem, '.2f')}{'×' if mem else ''} | {fmt(r['mfu'], '.1%')} | "
                         f"{Path(r['file']).name} |")  # fmt: skip
            if name in preferred and r["levers"] == args.summary_levers and a:
                entry = candidates.setdefault((r["shape"], name), {"config": r["levers"], "lease": name})
                entry.setdefault("step_over_anchor", {})[r["setting"]] = round(step, 3)
                entry.setdefault("memory_over_anchor", {})[r["setting"]] = mem and round(mem, 3)
        for folder in dirs.split(","):
            for path in sorted(Path(folder).glob("*.json")):
                doc = json.loads(path.read_text())
                for m in doc.get("measurements", []):
                    if m["phase"] == "profile" and "ds_config" in doc.get("meta", {}):
                        lines += ["", f"Profile of {m['what']}, {levers(doc['meta'])} (`{path.name}`), top rows by "
                                  "self CPU time and by self CUDA time:", "", "```"]  # fmt: skip
                        for table in ("by_self_cpu_time", "by_self_cuda_time"):
                            rows = m["tables"].get(table, "").splitlines()
                            lines += [row[:200] for row in rows[:14]] + [""]
                        lines.append("```")
        events = event_rows([Path(d) for d in dirs.split(",")], anchors)
        if events:
            lines += ["", "| shape | exert_ds levers | pass | tokens | s | anchor forward s | × anchor forward |",
                      "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
            for e in events:
                lines.append(f"| {e['shape']} | {e['levers']} | {e['what']} | {e['tokens']} | {e['seconds']:.2f} | "
                             f"{e['anchor_forward_s']:.2f} | {e['seconds'] / e['anchor_forward_s']:.1f}× |")  # fmt: skip
                if e["what"].startswith("event with TF32"):
                    summary.setdefault("event_over_anchor_forward", {})[e["shape"]] = {
                        "ratio": round(e["seconds"] / e["anchor_forward_s"], 2), "lease": name, "config": e["levers"],
                        "pbs_products": "TF32"}  # fmt: skip
        lines.append("")
    for shape in sorted({shape for shape, _ in candidates}):
        lease = next(name for name in preferred if (shape, name) in candidates)
        summary[shape] = candidates[shape, lease]
    for shape in ("7b", "8b"):
        if shape in summary and shape in summary.get("event_over_anchor_forward", {}):
            summary[shape]["event_over_anchor_forward"] = summary["event_over_anchor_forward"][shape]
    summary.pop("event_over_anchor_forward", None)
    for entry in summary.values():  # the keys no lease measured (null, with the note saying why)
        entry.update(json.loads(args.summary_extra))
    doc = {"date": args.summary_date, "summary_lease": args.summary_lease, "note": args.summary_note, **summary}
    args.summary.write_text(json.dumps(doc, indent=1) + "\n")
    if args.analysis:
        lines += ["", args.analysis.read_text().strip()]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.summary}")
    return doc


if __name__ == "__main__":
    main()
