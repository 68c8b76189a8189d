"""Turn run_analysis.py's outputs into analysis.md: are domain differences larger than task differences and than seed
noise, in the masks, the LoRA subspaces and the projection energies? Every sentence of the answer is computed from the
numbers in the JSON files, whichever way they fall.

  python3 eval/analysis/write_report.py OUT --out eval/results/analysis.md [--figures analysis]

OUT is run_analysis.py's --out (masks/, subspaces/, energy/, analysis_raw.json); --figures is where the PNGs are
linked from, relative to the markdown file (copy OUT's masks/, subspaces/, energy/ PNGs there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from exert_ds.analysis.energy import energy_differences  # noqa: E402

PAIRINGS = {
    "domain": ("health-s0", "legal-s0"),
    "task": ("qtype-s0", "answers-s0"),
    "seed": ("health-s0", "health-s1"),
    "domain×seed": ("health-s1", "legal-s0"),  # other domain and other seed: no shared initialisation
}
# (pairing, against): the questions asked; domain×seed against seed controls for the shared LoRA init of one seed
QUESTIONS = (("domain", "task"), ("domain", "seed"), ("domain×seed", "seed"))
ENERGY_DATA = {"domain": ("health", "legal"), "task": ("qtype", "answers")}


def cells(table: dict[str, list[dict]], field: str, transform=lambda v: v) -> dict[tuple[int, str], float]:
    """(block, role) → value of `field` from a role → per block table."""
    return {(block, role): transform(row[field]) for role, rows in table.items() for block, row in enumerate(rows)}


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def mask_table(out: Path, x: str, y: str) -> dict | None:
    found = load(out / "masks" / f"masks-{x}-vs-{y}.json") or load(out / "masks" / f"masks-{y}-vs-{x}.json")
    return found["roles"] if found else None


def subspace_table(out: Path, which: str, x: str, y: str) -> dict | None:
    found = load(out / "subspaces" / which / "subspaces.json")
    if not found:
        return None
    return found["pairs"].get(f"{x} vs {y}") or found["pairs"].get(f"{y} vs {x}")


def metrics(out: Path) -> dict[str, dict[str, dict[tuple[int, str], float]]]:
    """metric → pairing → (block, role) → difference (larger = more different)."""
    table: dict[str, dict[str, dict]] = {}
    for pairing, (x, y) in PAIRINGS.items():
        masks = mask_table(out, x, y)
        if masks:
            table.setdefault("mask: 1 − IoU of kept sets", {})[pairing] = cells(masks, "iou", lambda v: 1 - v)
            table.setdefault("mask: 1 − chance-corrected IoU", {})[pairing] = cells(
                masks, "chance_corrected", lambda v: 1 - v
            )
            table.setdefault("mask: rows not identical", {})[pairing] = cells(masks, "identical_rows", lambda v: 1 - v)
        for which, label in (("event0", "event 0"), ("final", "final event")):
            spaces = subspace_table(out, which, x, y)
            if spaces:
                for space in ("col_B", "row_A"):
                    name = f"subspace: Grassmann distance, {space}, {label} adapters"
                    table.setdefault(name, {})[pairing] = cells(spaces, space)
    base0, base1 = (
        load(out / "energy" / "base-seed0" / "energy.json"),
        load(out / "energy" / "base-seed1" / "energy.json"),
    )
    if base0:
        for pairing, (x, y) in ENERGY_DATA.items():
            diff = base0["differences"].get(f"{x} vs {y}")
            if diff:
                add_energy(table, "dense model on the pairing's data", pairing, diff)
        if base1:  # same data (health), other calibration windows
            add_energy(table, "dense model on the pairing's data", "seed", energy_differences(
                base0["results"]["health"], base1["results"]["health"]))  # fmt: skip
    experts = {run: load(out / "energy" / run / "energy.json") for run in ("health-s0", "health-s1", "legal-s0")}
    if all(experts.values()):
        for pairing in ("domain", "seed", "domain×seed"):
            x, y = PAIRINGS[pairing]
            for data in ("health", "legal"):
                diff = energy_differences(experts[x]["results"][data], experts[y]["results"][data])
                add_energy(table, f"experts on {data} data", pairing, diff)
    return table


def add_energy(table: dict, what: str, pairing: str, diff: dict) -> None:
    table.setdefault(f"energy: 1 − cosine of input channel profiles, {what}", {})[pairing] = cells(diff, "profile")
    table.setdefault(f"energy: abs ln of the output-energy ratio, {what}", {})[pairing] = cells(
        diff, "output_log_ratio"
    )


def verdict(values: dict[str, dict[tuple[int, str], float]], pairing: str, other: str) -> str:
    """'larger'/'not larger' from the means, with the number of (block, role) cells where `pairing` is larger."""
    if pairing not in values or other not in values:
        return "n/a"
    d, o = values[pairing], values[other]
    common = [k for k in d if k in o]
    wins = sum(d[k] > o[k] for k in common)
    word = "larger" if mean(d[k] for k in common) > mean(o[k] for k in common) else "not larger"
    return f"{word} ({wins}/{len(common)} cells)"


def fmt(values: dict[tuple[int, str], float] | None) -> str:
    return f"{mean(values.values()):.4f}" if values else "n/a"


def role_breakdown(values: dict[str, dict[tuple[int, str], float]]) -> list[str]:
    roles = list(dict.fromkeys(role for _, role in next(iter(values.values()))))
    lines = ["| pairing | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
    for pairing, cellmap in values.items():
        per_role = [mean(v for (b, r), v in cellmap.items() if r == role) for role in roles]
        lines.append(f"| {pairing} | " + " | ".join(f"{v:.4f}" for v in per_role) + " |")
    return lines


def where(values: dict[tuple[int, str], float], top: int = 3) -> str:
    blocks: dict[int, list[float]] = {}
    for (block, _), v in values.items():
        blocks.setdefault(block, []).append(v)
    ranked = sorted(blocks, key=lambda b: -mean(blocks[b]))[:top]
    return ", ".join(f"block {b} ({mean(blocks[b]):.4f})" for b in ranked)


def render(out: Path, figures: str) -> str:
    raw = load(out / "analysis_raw.json") or {}
    table = metrics(out)
    lines = [
        "# Domain structure of sparse experts (issue 16)",
        "",
        "SmolLM2-135M-Instruct (dequantised from Q4_1), LoRA r=16 under ZeRO-3, ForeSight + PBS (hessian) at 50%, the "
        "epoch schedule (events before epochs 1 and 2 and at the end). Three pairings, each two experts:",
        "- **domain**: health (eval/quality/health.yaml) vs legal (eval/quality/legal.yaml), seed 0;",
        "- **task**: MedQuAD question type (eval/analysis/health_qtype.yaml) vs MedQuAD answers "
        "(eval/analysis/health_answers.yaml), seed 0;",
        "- **seed**: health.yaml with seed 0 vs seed 1 (data order, LoRA init, calibration windows): the noise floor.",
        "",
        f"Run: `{raw.get('command', 'eval/analysis/run_analysis.py')}` on {raw.get('device', '?')}, "
        f"{raw.get('date', '?')}, {raw.get('seconds', '?')} s; versions {raw.get('versions', {})}. "
        "Regenerate this page: `python3 eval/analysis/write_report.py OUT --out eval/results/analysis.md`.",
        "",
    ]
    failed = {n: j["returncode"] for n, j in raw.get("jobs", {}).items() if j["returncode"] != 0}
    if failed:
        lines += [f"Jobs that did not finish: {failed}; their rows are missing below.", ""]
    lines += [
        "## The answer",
        "",
        "Each row is a difference measure (larger = more different), averaged over every (block, role) cell, for the "
        "three pairings and for health seed 1 vs legal seed 0 (domain×seed: two runs that share no initialisation). "
        "The last three columns answer the questions, with the number of cells where the first pairing is the larger.",
        "",
        "| measure | " + " | ".join(PAIRINGS) + " | " + " | ".join(f"{p} vs {o}" for p, o in QUESTIONS) + " |",
        "|---|" + "---|" * (len(PAIRINGS) + len(QUESTIONS)),
    ]
    for name, values in table.items():
        numbers = " | ".join(fmt(values.get(p)) for p in PAIRINGS)
        answers = " | ".join(verdict(values, p, o) for p, o in QUESTIONS)
        lines.append(f"| {name} | {numbers} | {answers} |")
    lines += ["", summary(table), ""]
    for name, values in table.items():
        if name.startswith(("mask: 1 − IoU", "subspace: Grassmann distance, col_B, event 0", "energy: 1 − cosine")):
            lines += [f"### {name}, per role", "", *role_breakdown(values), ""]
            if "domain" in values:
                lines += [f"Where the domains differ most: {where(values['domain'])}.", ""]
    lines += ["## Figures", ""]
    for sub in ("masks", "subspaces/event0", "subspaces/final", "energy/base-seed0"):
        for png in sorted((out / sub).glob("*.png")):
            lines.append(f"- [{sub}/{png.name}]({figures}/{sub}/{png.name})")
    lines += [
        "",
        "## How to read it",
        "",
        "- Masks: the IoU of two experts' kept sets per matrix, against 1/3 for two independent random masks at 50% "
        "(k/(2n−k), exert_ds/analysis/masks.py); the chance-corrected IoU is 0 at chance and 1 for equal masks.",
        "- Subspaces: Grassmann distance sqrt(Σθᵢ²) between the column spaces of B and the row spaces of A of two "
        "adapters (π/2·√16 ≈ 6.28 for orthogonal rank-16 subspaces). Event 0's adapters were both trained on the dense "
        "model; the final event's adapters were trained on each expert's own pruned weights.",
        "- Energies: the dense model's input channel RMS profiles sqrt(E/T) per projection compared between two "
        "calibration sets (1 − cosine), and the log ratio of the projections' output energies; the seed row compares "
        "the same health data drawn with calibration seed 0 and 1. The expert rows compare two experts on the same data.",
        "- One seed means one LoRA initialisation: PEFT draws the first A from the run seed, and every event re-draws A "
        "from (run seed, event, block, role). The domain and task pairings share that seed (seed 0), the seed pairing "
        "does not, so row_A distances (and anything the initial A shapes) compare a shared start against different "
        "starts. The domain×seed column (health seed 1 vs legal seed 0) removes the shared start: a domain effect "
        "beyond seed noise shows as domain×seed above seed.",
    ]
    return "\n".join(lines) + "\n"


def summary(table: dict[str, dict[str, dict]]) -> str:
    groups = {"mask": [], "subspace": [], "energy": []}
    for name, values in table.items():
        kind = name.split(":")[0]
        for pairing, other in QUESTIONS:
            if pairing in values and other in values:
                d, o = mean(values[pairing].values()), mean(values[other].values())
                groups[kind].append(((pairing, other), d > o))
    parts = []
    plural = {"mask": "masks", "subspace": "subspaces", "energy": "energies"}
    for kind, results in groups.items():
        if not results:
            parts.append(f"{plural[kind]}: not measured")
            continue
        for question in QUESTIONS:
            got = [r for q, r in results if q == question]
            if got:
                parts.append(
                    f"{plural[kind]}: the {question[0]} difference exceeds the {question[1]} difference in {sum(got)} "
                    f"of {len(got)} measures"
                )
    return "In short, " + "; ".join(parts) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="run_analysis.py's --out")
    parser.add_argument("--out", dest="markdown", type=Path, required=True, help="the markdown file to write")
    parser.add_argument("--figures", default="analysis", help="PNG folder, relative to the markdown file")
    args = parser.parse_args()
    args.markdown.write_text(render(args.out, args.figures))
    print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
