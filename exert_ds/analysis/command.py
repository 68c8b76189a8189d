"""`exert-ds analyze masks | subspaces | energy`: the domain-structure analysis, as JSON and PNG under --out.

    exert-ds analyze masks EXPERT_A EXPERT_B [...] --out DIR          # sparse experts or HF directories
    exert-ds analyze subspaces ADAPTER_A ADAPTER_B [...] [--base MODEL] --out DIR
    deepspeed --num_gpus N --module exert_ds analyze energy --model M --data health=H.yaml --data legal=L.yaml \
        --deepspeed ds_configs/zero3_bf16.json --out DIR

Every pair of the inputs given is compared. Everything is computed before anything is written; bad input stops
with one line and leaves --out as it was.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import re
import sys
from pathlib import Path

from exert_ds.errors import ConfigError

MASK_FIELDS = ("iou", "chance_corrected", "identical_rows")


def _names(paths: list[str], given: str | None, what: str) -> list[str]:
    """Labels of the inputs: --names, else the directory names (made unique), safe as file name parts."""
    if given:
        names = [n.strip() for n in given.split(",")]
        if len(names) != len(paths):
            raise ConfigError(f"--names gives {len(names)} names for {len(paths)} {what}; give one per input")
    else:
        names = [Path(p).resolve().name or f"input{i}" for i, p in enumerate(paths)]
        if len(set(names)) < len(names):
            names = [f"{i}-{n}" for i, n in enumerate(names)]
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", n) for n in names]
    if len(set(names)) < len(names):
        raise ConfigError(f"--names {given!r}: the names must differ")
    return names


def _header() -> dict:
    return {
        "command": "exert-ds " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=1))
    return path


def _out_dir(text: str) -> Path:
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; choose another")
    return out


def masks_command(args: argparse.Namespace) -> list[Path]:
    from exert_ds.analysis.masks import compare_masks
    from exert_ds.analysis.plots import heatmap
    from exert_ds.analysis.sources import check_same_model, open_source, parse_roles

    if len(args.experts) < 2:
        raise ConfigError("analyze masks needs at least two experts (sparse expert or Hugging Face directories)")
    roles = parse_roles(args.roles)
    out = _out_dir(args.out)
    names = _names(args.experts, args.names, "experts")
    sources = [open_source(p) for p in args.experts]
    check_same_model(sources)
    results = {}
    for (i, a), (j, b) in itertools.combinations(enumerate(sources), 2):
        results[(names[i], names[j])] = compare_masks(a, b, roles)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (x, y), table in results.items():
        stem = f"masks-{x}-vs-{y}"
        payload = {**_header(), "a": str(sources[names.index(x)].path), "b": str(sources[names.index(y)].path)}
        written.append(_write_json(out / f"{stem}.json", {**payload, "roles": table}))
        for field in MASK_FIELDS:
            values = {role: [row[field] for row in rows] for role, rows in table.items()}
            low = min(0.0, min(min(v) for v in values.values()))
            written.append(heatmap(values, f"{field}: {x} vs {y}", field, out / f"{stem}-{field}.png", vmin=low))
    return written


def subspaces_command(args: argparse.Namespace) -> list[Path]:
    from exert_ds.analysis.adapters import load_adapters
    from exert_ds.analysis.plots import layer_lines
    from exert_ds.analysis.sources import open_source, parse_roles
    from exert_ds.analysis.subspaces import compare_adapters, compare_with_weights

    roles = parse_roles(args.roles)
    if len(args.adapters) < 2 and not args.base:
        raise ConfigError("analyze subspaces needs two adapters, or one with --base MODEL")
    out = _out_dir(args.out)
    names = _names(args.adapters, args.names, "adapters")
    adapters = {name: load_adapters(path) for name, path in zip(names, args.adapters, strict=True)}
    layers = 1 + max(block for table in adapters.values() for block, _ in table)
    base = open_source(args.base) if args.base else None
    if base is not None:
        layers = base.num_layers
    pairs = {
        f"{x} vs {y}": compare_adapters(adapters[x], adapters[y], roles, layers, (x, y))
        for x, y in itertools.combinations(names, 2)
    }
    to_weights = (
        {name: compare_with_weights(table, base, roles, name) for name, table in adapters.items()} if base else {}
    )
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        **_header(),
        "adapters": dict(zip(names, args.adapters, strict=True)),
        "base": args.base,
        "pairs": pairs,
        "to_weights": to_weights,
    }
    written = [_write_json(out / "subspaces.json", payload)]
    for space in ("col_B", "row_A"):
        if pairs:
            series = {pair: {r: [row[space] for row in rows] for r, rows in t.items()} for pair, t in pairs.items()}
            title = f"Grassmann distance between adapters, {space}"
            written.append(layer_lines(series, title, "distance (rad)", out / f"subspaces-pairs-{space}.png"))
        if to_weights:
            series = {n: {r: [row[space] for row in rows] for r, rows in t.items()} for n, t in to_weights.items()}
            title = f"Grassmann distance, adapter vs top-r singular subspace of W, {space}"
            written.append(layer_lines(series, title, "distance (rad)", out / f"subspaces-weights-{space}.png"))
    return written


def _data_sources(spec: str):
    """NAME=PATH[:FIELD] (text records) or NAME=RUN.yaml (that run's calibration sources) → (name, sources)."""
    from exert_ds.config import load_config
    from exert_ds.data import DataSource

    name, sep, where = spec.partition("=")
    if not sep or not name or not where:
        raise ConfigError(f"--data {spec!r}: expected NAME=PATH[:FIELD] or NAME=RUN.yaml")
    if where.endswith((".yaml", ".yml")):
        return name, load_config(where, {}).calibration_sources()
    path, _, field = (where, "", "") if Path(where).exists() else where.rpartition(":")
    path = path or where
    return name, [DataSource(path=path, text_field=field or "text")]


def energy_command(args: argparse.Namespace) -> list[Path] | None:
    from exert_ds.analysis.energy import energy_differences, projection_energy
    from exert_ds.analysis.plots import layer_lines
    from exert_ds.config import ModelConfig
    from exert_ds.data import calibration_batch
    from exert_ds.errors import user_errors
    from exert_ds.evaluation.model_runtime import open_model
    from exert_ds.runtime.access import DenseBackend
    from exert_ds.runtime.dist import launched_world_size

    out = _out_dir(args.out)
    data = dict(_data_sources(spec) for spec in args.data)
    if len(data) < len(args.data):
        raise ConfigError("--data: the names must differ")
    world = launched_world_size()
    if args.num_samples % world:
        raise ConfigError(f"--num-samples {args.num_samples} must be a multiple of the world size {world}")
    runtime = open_model(ModelConfig(name_or_path=args.model, dtype=args.dtype), args.deepspeed)
    try:
        if runtime.zero3:
            from exert_ds.runtime.zero3 import Zero3Backend, check_leaf_modules

            check_leaf_modules(runtime.model)  # the energy pass calls the blocks one by one, as an event does
            backend = Zero3Backend()
        else:
            backend = DenseBackend()
        reduce = runtime.reduce or backend.all_reduce
        results = {}
        for name, sources in data.items():
            with user_errors(f"--data {name}"):
                ids = calibration_batch(sources, runtime.tokenizer, args.num_samples, args.seq_len, args.seed)
            share = ids[runtime.rank :: runtime.world]
            runtime.log(f"energy of {args.model} on {name}: {ids.shape[0]} × {ids.shape[1]} tokens")
            results[name] = projection_energy(runtime.model, share, args.micro_batch, reduce, backend.whole_block)
        if runtime.rank != 0:
            return None
        differences = {
            f"{x} vs {y}": energy_differences(results[x], results[y]) for x, y in itertools.combinations(data, 2)
        }
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            **_header(),
            "model": args.model,
            "data": {name: [s.path for s in sources] for name, sources in data.items()},
            "num_samples": args.num_samples,
            "seq_len": args.seq_len,
            "world_size": runtime.world,
            "zero3": runtime.zero3,
            "results": results,
            "differences": differences,
        }
        written = [_write_json(out / "energy.json", payload)]
        for quantity in ("output_energy", "input_energy", "foresight_mean"):
            series = {
                n: {r: [row[quantity] for row in rows] for r, rows in res["roles"].items()}
                for n, res in results.items()
            }
            written.append(
                layer_lines(
                    series, f"{quantity} of {Path(args.model).name}", quantity, out / f"energy-{quantity}.png", log=True
                )
            )
        if differences:
            series = {p: {r: [row["profile"] for row in rows] for r, rows in d.items()} for p, d in differences.items()}
            written.append(
                layer_lines(
                    series, "1 − cosine of input channel RMS profiles", "distance", out / "energy-profile-distance.png"
                )
            )
        return written
    finally:
        runtime.close()


def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    text = "the paper's domain-structure analysis: mask overlap, LoRA subspace distances, projection energy"
    p = sub.add_parser("analyze", help=text, description=text)
    kinds = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    masks = kinds.add_parser(
        "masks",
        help="per block and role: IoU of the kept sets, identical rows, and the IoU of random masks (JSON + heatmaps)",
    )
    masks.add_argument("experts", nargs="+", metavar="EXPERT", help="sparse expert or Hugging Face directories (2+)")

    spaces = kinds.add_parser(
        "subspaces",
        help="per block and role: Grassmann distances between LoRA adapters (col B, row A), and to the base weight's "
        "top-r singular subspaces (JSON + line plots)",
    )
    spaces.add_argument(
        "adapters",
        nargs="+",
        metavar="ADAPTER",
        help="PEFT adapter directories (e.g. output_dir/event_adapters/event-0) or training checkpoints",
    )
    spaces.add_argument(
        "--base", default=None, metavar="MODEL", help="the weights the adapters adapt (expert or HF dir)"
    )

    energy = kinds.add_parser(
        "energy",
        help="per block and role: activation energy E, output energy and ForeSight companion norms on each domain's "
        "calibration data (JSON + plots); under a launcher with --deepspeed it runs on ZeRO-3 partitions",
    )
    energy.add_argument("--model", required=True, help="HF directory, hub name, .gguf or sparse expert directory")
    energy.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="calibration text: NAME=PATH[:FIELD] (text records) or NAME=RUN.yaml (that run's calibration sources)",
    )
    energy.add_argument("--deepspeed", default=None, help="a ZeRO stage-3 DeepSpeed JSON: run on ZeRO-3 partitions")
    energy.add_argument("--num-samples", type=int, default=64, help="calibration sequences per domain")
    energy.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    energy.add_argument("--micro-batch", type=int, default=4, help="sequences per forward")
    energy.add_argument("--seed", type=int, default=0, help="picks the calibration windows")
    energy.add_argument("--dtype", default="float32", help="torch dtype to load the model in")
    for kind in (masks, spaces, energy):
        kind.add_argument("--out", required=True, metavar="DIR", help="folder for the JSON and PNG files")
    for kind in (masks, spaces):
        kind.add_argument("--roles", default=None, help="comma-separated roles (default: q,k,v,o,gate,up,down)")
        kind.add_argument("--names", default=None, help="comma-separated labels of the inputs (default: folder names)")


def analyze_command(args: argparse.Namespace) -> int:
    if args.analysis == "masks":
        written = masks_command(args)
    elif args.analysis == "subspaces":
        written = subspaces_command(args)
    else:
        written = energy_command(args)
    for path in written or ():
        print(f"wrote {path}")
    return 0
