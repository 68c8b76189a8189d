"""`exert-ds inspect`: what a training checkpoint or a sparse expert holds, and whether every file is intact.

Reads only manifests, the packed bitmasks (for the measured sparsity) and, for integrity, every file once
(sha256 against the manifest). Nothing is loaded onto a device and no process group is started.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from exert_ds.errors import ConfigError
from exert_ds.model.architecture import LLAMA_LIKE_ROLES
from exert_ds.storage.checkpoint import complete_checkpoints
from exert_ds.storage.checkpoint import read_manifest as read_checkpoint_manifest
from exert_ds.storage.checkpoint_schema import LATEST, WEIGHTS
from exert_ds.storage.checkpoint_schema import MANIFEST as CHECKPOINT_MANIFEST
from exert_ds.storage.checkpoint_schema import rank_file as checkpoint_rank_file
from exert_ds.storage.expert import damage_line, damaged_files, is_expert_dir, rank_file, read_manifest


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""


def _popcount(mask: torch.Tensor) -> int:
    return int(np.bitwise_count(mask.numpy()).sum(dtype=np.int64))


def _role(name: str) -> str | None:
    return next((role for role, sub in LLAMA_LIKE_ROLES.items() if f".{sub}." in f"{name}."), None)


def _sparsity_lines(zeros: dict[str, list[int]]) -> list[str]:
    if not zeros:
        return ["  measured sparsity: no pruned matrices stored"]
    total = [sum(z for z, _ in zeros.values()), sum(n for _, n in zeros.values())]
    roles = ", ".join(f"{role} {z / n:.4f}" for role, (z, n) in zeros.items())
    return [f"  measured sparsity (stored bitmasks): {roles}; all pruned {total[0] / total[1]:.4f}"]


def _file_lines(path: Path, files: dict[str, str], bad: dict[str, str]) -> list[str]:
    lines = [f"  files ({len(files)}):"]
    for name in files:
        file = path / name
        size = _size(file.stat().st_size) if file.is_file() else "-"
        status = "OK" if name not in bad else f"DAMAGED ({bad[name]})"
        lines.append(f"    {status:<8} {size:>10}  {name}")
    state = "OK" if not bad else f"DAMAGED: {len(bad)} of {len(files)} files missing, truncated or altered"
    lines.append(f"  integrity: {state}")
    return lines


def _base_model_line(base_model: dict | None) -> list[str]:
    if not base_model:
        return ["  base model: no fingerprint recorded"]
    files = base_model["files"]
    return [f"  base model {base_model['path']}: {len(files)} files fingerprinted ({', '.join(sorted(files)[:3])}…)"]


def describe_checkpoint(path: Path) -> tuple[list[str], str | None]:
    manifest = read_checkpoint_manifest(path)
    position, world = manifest["position"], manifest["world_size"]
    lines = [
        f"training checkpoint {path}",
        f"  step {position['step']} (epoch {position['epoch']}, micro-batch {position['micro']}), prune events done "
        f"{position['events_done']}, world size {world}, format {manifest['format']}, config fingerprint "
        f"{manifest['config_fingerprint'][:12]}",
    ]
    lines += _base_model_line(manifest.get("base_model"))
    bad = damaged_files(path, manifest)
    rank_files = [checkpoint_rank_file(r) for r in range(world)]
    if any(name in bad for name in rank_files):
        lines.append("  measured sparsity: unavailable (a rank file is damaged)")
    else:
        zeros: dict[str, list[int]] = {}
        for name in rank_files:
            weights = torch.load(path / name, mmap=True, weights_only=False)[WEIGHTS]
            for param, packed in weights.items():
                count = zeros.setdefault(_role(param) or param, [0, 0])
                count[0] += int(packed["numel"]) - _popcount(packed["mask"])
                count[1] += int(packed["numel"])
        lines += _sparsity_lines(zeros)
    problem = None
    if bad:
        name, why = next(iter(bad.items()))
        problem = f"{path / name} is {why} against {CHECKPOINT_MANIFEST}; the checkpoint is damaged"
    return lines + _file_lines(path, manifest["files"], bad), problem


def describe_expert(path: Path) -> tuple[list[str], str | None]:
    manifest = read_manifest(path)
    world, promise, tensors = manifest["world_size"], manifest["promise"], manifest["tensors"]
    sparse = {name: e for name, e in tensors.items() if e["storage"] == "sparse"}
    pattern = f"{promise['n']}:{promise['m']}" if promise["m"] else f"sparsity {promise['sparsity']} per row"
    lines = [
        f"sparse expert {path}",
        f"  world size {world}, format {manifest['format_version']}, {len(tensors)} tensors ({len(sparse)} stored "
        f"sparse), promised {pattern}",
    ]
    lines += _base_model_line(manifest.get("base_model"))
    bad = damaged_files(path, manifest)
    if any(rank_file(r, world) in bad for r in range(world)):
        lines.append("  measured sparsity: unavailable (a rank file is damaged)")
    else:
        zeros: dict[str, list[int]] = {}
        for rank in range(world):
            with safe_open(path / rank_file(rank, world), framework="pt") as fh:
                for name, entry in sparse.items():
                    start, end = entry["ranges"][rank]
                    count = zeros.setdefault(entry["role"], [0, 0])
                    count[0] += (end - start) - _popcount(fh.get_tensor(f"{name}.mask"))
                    count[1] += end - start
        lines += _sparsity_lines(zeros)
    return lines + _file_lines(path, manifest["files"], bad), damage_line(path, bad) if bad else None


def _latest(root: Path) -> Path:
    """The checkpoint `root/latest` names, or a ConfigError when `latest` is damaged (naming the newest complete
    checkpoint, which `--resume auto` would take)."""
    latest = root / LATEST
    try:
        named = latest.read_text().strip()
    except (OSError, UnicodeDecodeError):
        named = ""
    if named and "/" not in named and (root / named / CHECKPOINT_MANIFEST).is_file():
        return root / named
    complete = complete_checkpoints(root)
    newest = f"the newest complete checkpoint is {complete[0]}" if complete else "no complete checkpoint is left"
    raise ConfigError(f"inspect {root}: {latest} is damaged (it names {named[:80]!r}, not a checkpoint); {newest}")


def describe(path: str | Path) -> tuple[list[str], str | None]:
    """(report lines, None or the one line naming the first damaged file) for a checkpoint directory, a
    checkpoints root (its `latest`) or an expert."""
    path = Path(path)
    if is_expert_dir(path):
        return describe_expert(path)
    if (path / CHECKPOINT_MANIFEST).is_file():
        return describe_checkpoint(path)
    if (path / LATEST).is_file():
        return describe_checkpoint(_latest(path))
    raise ConfigError(
        f"inspect {path}: neither a training checkpoint ({CHECKPOINT_MANIFEST}) nor a sparse expert; give "
        "output_dir/checkpoints/step-…, output_dir/checkpoints or output_dir/expert"
    )


def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    text = (
        "print what a training checkpoint or a sparse expert holds: step, prune events done, measured sparsity per "
        "role (from the stored bitmasks), world size, files with sizes, and the sha256 check of every file; exit "
        "status 1 if any file is missing, truncated or altered"
    )
    p = sub.add_parser("inspect", help=text, description=text)
    p.add_argument(
        "path",
        metavar="CKPT",
        help="output_dir/checkpoints/step-… (a training checkpoint), output_dir/checkpoints (its latest) or "
        "output_dir/expert (the sparse expert)",
    )


def inspect_command(args: argparse.Namespace) -> int:
    """Print the report; exit status 1 with the same one `exert-ds: error:` line as export or resume when a file
    is missing, truncated or altered."""
    lines, problem = describe(args.path)
    print("\n".join(lines))
    if problem:
        print(f"exert-ds: error: {problem}", file=sys.stderr)
        return 1
    return 0
