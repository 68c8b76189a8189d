"""`exert-ds inspect`: what a training checkpoint or a sparse expert holds, and whether every file is intact.

Reads only manifests, the packed bitmasks (for the measured sparsity) and, for integrity, every file once
(sha256 against the manifest). Nothing is loaded onto a device and no process group is started; torch is not
imported (the per-rank checkpoint files are read by torch_archive.py, the expert's by safetensors' numpy reader),
so the answer comes in about a second (README, "CLI speed").
"""

from __future__ import annotations

import argparse
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
from safetensors import safe_open

from exert_ds.errors import ConfigError
from exert_ds.roles import role_of
from exert_ds.storage import torch_archive
from exert_ds.storage.manifest import (
    CHECKPOINT_MANIFEST,
    LATEST,
    checkpoint_rank_file,
    complete_checkpoints,
    damage_line,
    damaged_files,
    expert_rank_file,
    is_expert_dir,
    read_checkpoint_manifest,
    read_expert_manifest,
)


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""


def _popcount(mask: np.ndarray) -> int:
    return int(np.bitwise_count(mask).sum(dtype=np.int64))


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


def stored_masks(file: Path) -> dict[str, tuple[int, np.ndarray]]:
    """parameter name → (elements, packed bitmask) of a checkpoint's per-rank file. Read without torch; a file that
    torch_archive cannot read (another torch format, an object it does not know) goes through torch.load."""
    try:
        weights = torch_archive.load(file)["weights"]
        return {name: (int(p["numel"]), p["mask"].numpy()) for name, p in weights.items()}
    except (pickle.UnpicklingError, zipfile.BadZipFile):
        import torch

        weights = torch.load(file, mmap=True, weights_only=False)["weights"]
        return {name: (int(p["numel"]), p["mask"].numpy()) for name, p in weights.items()}


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
    if position.get("allocation"):  # prune.allocation owl
        lines.append("  OWL block sparsities at the target: " + ", ".join(f"{s:.4f}" for s in position["allocation"]))
    lines += _base_model_line(manifest.get("base_model"))
    bad = damaged_files(path, manifest)
    rank_files = [checkpoint_rank_file(r) for r in range(world)]
    if any(name in bad for name in rank_files):
        lines.append("  measured sparsity: unavailable (a rank file is damaged)")
    else:
        zeros: dict[str, list[int]] = {}
        for name in rank_files:
            for param, (numel, mask) in stored_masks(path / name).items():
                count = zeros.setdefault(role_of(param) or param, [0, 0])
                count[0] += numel - _popcount(mask)
                count[1] += numel
        lines += _sparsity_lines(zeros)
    problem = None
    if bad:
        name, why = next(iter(bad.items()))
        problem = f"{path / name} is {why} against {CHECKPOINT_MANIFEST}; the checkpoint is damaged"
    return lines + _file_lines(path, manifest["files"], bad), problem


def describe_expert(path: Path) -> tuple[list[str], str | None]:
    manifest = read_expert_manifest(path)
    world, promise, tensors = manifest["world_size"], manifest["promise"], manifest["tensors"]
    sparse = {name: e for name, e in tensors.items() if e["storage"] == "sparse"}
    pattern = f"{promise['n']}:{promise['m']}" if promise["m"] else f"sparsity {promise['sparsity']} per row"
    if promise.get("blocks"):  # prune.allocation owl
        blocks = promise["blocks"]
        pattern += f" on average over blocks (OWL allocation, {min(blocks):.4f}–{max(blocks):.4f} per block)"
    lines = [
        f"sparse expert {path}",
        f"  world size {world}, format {manifest['format_version']}, {len(tensors)} tensors ({len(sparse)} stored "
        f"sparse), promised {pattern}",
    ]
    lines += _base_model_line(manifest.get("base_model"))
    bad = damaged_files(path, manifest)
    if any(expert_rank_file(r, world) in bad for r in range(world)):
        lines.append("  measured sparsity: unavailable (a rank file is damaged)")
    else:
        zeros: dict[str, list[int]] = {}
        for rank in range(world):
            with safe_open(path / expert_rank_file(rank, world), framework="numpy") as fh:
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


def inspect_command(args: argparse.Namespace) -> int:
    """Print the report; exit status 1 with the same one `exert-ds: error:` line as export or resume when a file
    is missing, truncated or altered."""
    lines, problem = describe(args.path)
    print("\n".join(lines))
    if problem:
        print(f"exert-ds: error: {problem}", file=sys.stderr)
        return 1
    return 0
