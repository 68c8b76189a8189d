"""The training checkpoint's schema: every file name, manifest key and rank-file key in one place, the per-rank
tensor fields, and the one function that turns the loaded rank files into this rank's state.

A rank file (`manifest.checkpoint_rank_file(r)`, one `torch.save` dict per writing rank) holds one entry per `RankField` (each a
name → this rank's flat fragment of a tensor sharded like a manifest entry) plus `RNG` and `ENGINE_SCALARS`.
Format 4 added the manifest's `FIELD_TABLE` and may store the EMA sparse-coded; format 3 had the same rank-file
keys with the EMA stored dense, and still loads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from deepspeed.checkpoint.constants import ZERO_FILE_PREFIX
from torch import Tensor, nn

from exert_ds.runtime.shard import all_shard_ranges

ENGINE_TAG = "engine"  # DeepSpeed's engine checkpoint goes to <checkpoint>/engine/
DECODE_THREADS = min(8, os.cpu_count() or 1)  # rank-file entries decoded in parallel on a resume

# manifest keys
FORMAT = "format"
WORLD_SIZE = "world_size"
MICRO_BATCH = "micro_batch"
TRAIN_BATCH_SIZE = "train_batch_size"
POSITION = "position"
FINGERPRINT = "config_fingerprint"
PARAMS = "params"  # pruned base weights: name → shape, dtype, ranges (one [start, end) per writing rank)
TRAINABLE = "trainable"  # LoRA parameters: name → shape, ranges; also the rank-file key of their fp32/Adam slices
FILES = "files"  # relative path → sha256
FIELD_TABLE = "fields"  # rank-file key → the manifest table its fragments are sharded like (format 4)

# rank-file keys: the fields' (checkpoint_fields.FIELDS; TRAINABLE above) and the rest
WEIGHTS = "weights"
EMA = "ema"
RNG = "rng"
ENGINE_SCALARS = "engine"


def is_engine_file_of(name: str, rank: int) -> bool:
    """Whether DeepSpeed's file `name` was written by `rank` (zero_pp_rank_R_…, bf16_zero_pp_rank_R_…)."""
    return f"{ZERO_FILE_PREFIX}{rank}_" in name


def is_rank_engine_file(name: str) -> bool:
    """Whether DeepSpeed's file `name` belongs to one rank (else it is shared, and rank 0 hashes it)."""
    return ZERO_FILE_PREFIX in name


Stored = Tensor | dict[str, Any]
Fragment = Tensor | dict[str, Tensor]  # one flat tensor, or several of equal length (fp32 master + Adam moments)


@dataclass(frozen=True)
class RankField:
    """One per-rank tensor family of the checkpoint. To add one, append a RankField to `checkpoint_fields.FIELDS`:
    save, both resume paths, re-cut and the manifest follow from it.

    - `key`: its rank-file key; `table`: PARAMS or TRAINABLE, the manifest entries its fragments are sharded like.
    - `names(model)`: entry key in the rank file → manifest name of the tensor it is sharded like.
    - `save(state)`: entry key → this rank's valid flat elements, as host tensors the caller may keep (copies).
      `state` is `checkpoint.TrainState` (the engine and the EMA).
    - `encode` / `decode`: stored form of one entry (e.g. the sparse codec) and back, losslessly.
    - `restore(state, values)`: put this rank's assembled fragments (entry key → flat tensor) into `state`.
    - `by_engine`: DeepSpeed's own files restore it at the writing world size (only a re-cut restores it here).
    """

    key: str
    table: str
    names: Callable[[nn.Module], dict[str, str]]
    save: Callable[[Any], dict[str, Fragment]]
    restore: Callable[[Any, dict[str, Fragment]], None]
    encode: Callable[[Fragment], Stored] = lambda value: value
    decode: Callable[[Stored], Fragment] = lambda stored: stored
    by_engine: bool = False


def manifest_fields(manifest: Mapping) -> dict[str, str]:
    """Rank-file key → table of the fields a checkpoint holds (format 3 lists none: its three are implied)."""
    if manifest.get(FORMAT) == 3:
        return {WEIGHTS: PARAMS, EMA: PARAMS, TRAINABLE: TRAINABLE}
    return dict(manifest.get(FIELD_TABLE, {}))


def recut(fragments: Mapping[int, Fragment], ranges: list[list[int]], lo: int, hi: int) -> Fragment:
    """Flat elements [lo, hi) assembled from the writing ranks' fragments (`fragments[r]` holds `ranges[r]`; only the
    overlapping ranks need be given). A dict fragment is re-cut key by key. Always a fresh tensor."""
    first = next(iter(fragments.values()))
    if isinstance(first, dict):
        return {k: recut({r: f[k] for r, f in fragments.items()}, ranges, lo, hi) for k in first}
    parts = [
        fragments[r][max(lo, a) - a : min(hi, b) - a] for r, (a, b) in enumerate(ranges) if max(lo, a) < min(hi, b)
    ]
    return torch.cat(parts) if parts else first.new_empty(0)


def overlapping_ranks(ranges: list[list[int]], lo: int, hi: int) -> list[int]:
    return [r for r, (a, b) in enumerate(ranges) if max(lo, a) < min(hi, b)]


def assemble(
    files: Mapping[int, Mapping],
    manifest: Mapping,
    model: nn.Module,
    fields: tuple[RankField, ...],
    world: int,
    rank: int,
) -> dict[str, dict[str, Fragment]]:
    """This rank's state, field → entry → flat fragment, from the loaded rank files (`files[r]`: writing rank r's).

    The one path of both resumes: at the writing world size `files` is this rank's own file and each fragment is its
    own slice; at another one, the writing ranks' files that overlap this rank's new range (`ranks_needed`). Entries
    a file lacks (the EMA before the first event) are left out. Raises KeyError naming a field the checkpoint lacks."""
    held = manifest_fields(manifest)
    plan: list[tuple[RankField, str, dict, list[int]]] = []  # field, entry, manifest entry, writing ranks it needs
    for field in fields:
        if field.key not in held:
            raise KeyError(field.key)
        table = manifest[field.table]
        for entry, name in field.names(model).items():
            meta = table[name]
            new = all_shard_ranges(tuple(meta["shape"]), world)[rank]
            owners = overlapping_ranks(meta["ranges"], new.start, new.end) or [min(files)]  # []: an empty range
            if all(entry in files[r][field.key] for r in owners):
                plan.append((field, entry, meta, owners))
    jobs = [(field, entry, r) for field, entry, _, owners in plan for r in owners]
    with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, max(len(jobs), 1))) as pool:  # numpy/torch free the GIL
        decoded = dict(
            zip(jobs, pool.map(lambda job: job[0].decode(files[job[2]][job[0].key][job[1]]), jobs), strict=True)
        )
    out: dict[str, dict[str, Fragment]] = {field.key: {} for field in fields}
    for field, entry, meta, owners in plan:
        new = all_shard_ranges(tuple(meta["shape"]), world)[rank]
        parts = {r: decoded.pop((field, entry, r)) for r in owners}
        out[field.key][entry] = recut(parts, meta["ranges"], new.start, new.end)
    return out


def ranks_needed(manifest: Mapping, world: int, rank: int) -> list[int]:
    """The writing ranks whose flat ranges overlap this rank's new range of any saved tensor, and 0 (whose file
    also holds the engine scalars and the RNG every rank takes at a re-cut)."""
    needed = {0}
    for table in {t for t in manifest_fields(manifest).values()}:
        for entry in manifest[table].values():
            new = all_shard_ranges(tuple(entry["shape"]), world)[rank]
            needed |= set(overlapping_ranks(entry["ranges"], new.start, new.end))
    return sorted(needed)
