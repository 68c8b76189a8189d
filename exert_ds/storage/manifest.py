"""The file names and manifests of the two folders exert-ds writes, a training checkpoint and a sparse expert,
read and checked without torch or deepspeed: `exert-ds inspect` answers from them without those imports (README,
"CLI speed"); checkpoint.py and expert.py write them.

A checkpoint folder (checkpoint.py) holds `manifest.json`, DeepSpeed's engine files and one `base-rankRRRRR.pt` per
writing rank; its parent holds `latest`, the name of the newest one. An expert folder (expert.py) holds
`expert_manifest.json`, one `expert-rankRRRRR-of-WWWWW.safetensors` per writing rank, config and tokenizer files.
Each manifest records the sha256 of every other file and, under `manifest_sha256`, its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from exert_ds.errors import ConfigError

CHECKPOINT_MANIFEST = "manifest.json"
CHECKPOINT_FORMAT_VERSION = 4  # written now; format 3 (the EMA stored dense, no field table) still loads
CHECKPOINT_READABLE_FORMATS = (3, 4)
CHECKPOINT_KEYS = ("world_size", "micro_batch", "train_batch_size", "position", "params", "trainable", "files")
LATEST = "latest"  # in the checkpoints root: the newest complete checkpoint's folder name
EXPERT_MANIFEST = "expert_manifest.json"
EXPERT_FORMAT = "exert-ds-expert"
EXPERT_FORMAT_VERSION = 1
MANIFEST_DIGEST = "manifest_sha256"  # the manifest's own sha256 (of its other keys, canonical JSON)


def checkpoint_rank_file(rank: int) -> str:
    """The file of writing rank `rank` in a training checkpoint: its sparse base partitions, EMA, RNG, LoRA slice."""
    return f"base-rank{rank:05d}.pt"


def expert_rank_file(rank: int, world: int) -> str:
    """The safetensors file of writing rank `rank` of `world` in a sparse expert."""
    return f"expert-rank{rank:05d}-of-{world:05d}.safetensors"


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest's keys other than its own digest, as canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_format_problem(manifest: dict, where: str) -> str | None:
    """What is wrong with a checkpoint manifest's format for this exert-ds, or None when it can be read."""
    if manifest.get("format") not in CHECKPOINT_READABLE_FORMATS:
        return (
            f"{where} has checkpoint format {manifest.get('format')}; this exert-ds reads formats "
            f"{CHECKPOINT_READABLE_FORMATS}: resume it with the exert-ds version that wrote it, or start the run again"
        )
    return None


def read_checkpoint_manifest(path: Path) -> dict:
    """The manifest of checkpoint `path`, or a ConfigError naming it when it is missing, cannot be parsed, lacks a
    key or differs from its own recorded sha256 (truncated or altered)."""
    file = path / CHECKPOINT_MANIFEST
    if not file.is_file():
        raise ConfigError(f"{file} is missing; {path} is not a complete checkpoint")
    damaged = f"{file} is damaged"
    fix = "resume from another checkpoint (--resume DIR)"
    try:
        manifest = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{damaged} (not valid JSON: {err}); {fix}") from err
    if not isinstance(manifest, dict):
        raise ConfigError(f"{damaged} (not a JSON object); {fix}")
    problem = checkpoint_format_problem(manifest, str(file))
    if problem:
        raise ConfigError(problem)
    missing = [key for key in CHECKPOINT_KEYS if key not in manifest]
    if missing:
        raise ConfigError(f"{damaged} (no {', '.join(missing)}); {fix}")
    if MANIFEST_DIGEST in manifest and manifest[MANIFEST_DIGEST] != manifest_digest(manifest):
        raise ConfigError(f"{damaged} (altered: its content differs from the sha256 it records); {fix}")
    return manifest


def complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoints under `root` whose manifest is intact and whose files all exist, newest first (their
    contents are checked against the sha256s when one is loaded)."""
    found = []
    for path in sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True):
        try:
            manifest = read_checkpoint_manifest(path)
        except ConfigError:
            continue
        if all((path / rel).is_file() for rel in manifest["files"]):
            found.append(path)
    return found


def is_expert_dir(path: str | Path) -> bool:
    """Whether `path` holds an expert manifest (intact or not: read_expert_manifest says what is wrong with it)."""
    return (Path(path) / EXPERT_MANIFEST).is_file()


def read_expert_manifest(path: str | Path) -> dict:
    """The expert's manifest, or a ConfigError naming it when it is missing, cannot be parsed, is not an expert's,
    lacks a key or differs from its own recorded sha256 (truncated or altered)."""
    file = Path(path) / EXPERT_MANIFEST
    if not file.is_file():
        raise ConfigError(f"{file} is missing; give the expert directory a run wrote")
    damaged = f"{file} is damaged"
    fix = "the expert is damaged, write it again"
    try:
        manifest = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{damaged} (not valid JSON: {err}); {fix}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != EXPERT_FORMAT:
        raise ConfigError(f"{file} is not an exert-ds expert manifest; give the expert directory a run wrote")
    if manifest.get("format_version") != EXPERT_FORMAT_VERSION:
        raise ConfigError(
            f"{file}: expert format {manifest.get('format_version')}, this exert-ds reads {EXPERT_FORMAT_VERSION}"
        )
    missing = [key for key in ("world_size", "promise", "tensors", "files") if key not in manifest]
    if missing:
        raise ConfigError(f"{damaged} (no {', '.join(missing)}); {fix}")
    if MANIFEST_DIGEST in manifest and manifest[MANIFEST_DIGEST] != manifest_digest(manifest):
        raise ConfigError(f"{damaged} (altered: its content differs from the sha256 it records); {fix}")
    return manifest


def damaged_files(path: str | Path, manifest: dict) -> dict[str, str]:
    """file name → what is wrong ('missing' or 'sha256 differs'), for every file the manifest lists, in the
    manifest's order. The files are hashed in parallel, one thread per file up to the CPU count: hashlib releases
    the GIL while it hashes, so a checkpoint's rank files are checked in about the time of the largest one."""
    path = Path(path)

    def problem(item: tuple[str, str]) -> str | None:
        file = path / item[0]
        if not file.is_file():
            return "missing"
        return None if sha256_file(file) == item[1] else "sha256 differs (truncated or altered)"

    items = list(manifest["files"].items())
    with ThreadPoolExecutor(max_workers=max(1, min(len(items), os.cpu_count() or 1))) as pool:
        found = list(pool.map(problem, items))
    return {name: why for (name, _), why in zip(items, found, strict=True) if why}


def damage_line(path: str | Path, bad: dict[str, str]) -> str:
    """The one line that names the first damaged file of `bad` (damaged_files' answer)."""
    name, why = next(iter(bad.items()))
    return f"{Path(path) / name} is {why} against {EXPERT_MANIFEST}; the expert is damaged, write it again"
