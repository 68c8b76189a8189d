"""Sharded, sparse, atomic training checkpoints (zero3.md "Checkpoints"); the schema (names, keys, the one loader of
both resume paths) is in checkpoint_schema.py and the per-rank tensor fields in checkpoint_fields.py.

A checkpoint directory holds DeepSpeed's own engine checkpoint for the trainable state (LoRA, optimizer,
scheduler; frozen parameters excluded), one file per rank with that rank's fragment of every field (the pruned base
weights stored sparse, the EMA score partitions, its slice of the LoRA fp32 masters and Adam moments), its RNG states
and engine scalars, and a manifest (world size, batch sizes, ranges, shapes, dtypes, fields, position, config
fingerprint, base-model fingerprint (base_model.py), sha256 of every file, and its own sha256). The device-to-host copies and DeepSpeed's engine save are synchronous; the rest
(encoding, torch.save, fsync, sha256, manifest, atomic rename, `latest`, pruning old checkpoints) runs on a
background writer (checkpoint_writer.py) while training goes on; the next save and the end of training wait for it.
At the writing world size a load restores the trainable state through DeepSpeed and the rest from this rank's own
file; at another one each rank re-cuts the writing ranks' files through the manifest's ranges. Both go through
`checkpoint_schema.assemble`. Rank files are memory-mapped and read in parallel, their sha256 computed on the same
pages while they are decoded; nothing is restored before every rank's files are verified.
"""

from __future__ import annotations

import copy
import hashlib
import json
import mmap
import os
import random
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from torch import Tensor, nn

from exert_ds.errors import ConfigError
from exert_ds.runtime.shard import all_shard_ranges
from exert_ds.storage.atomic import (
    SharedWrite,
    WriteError,
    fsync_path,
    publish,
    torch_save,
    write_error,
    write_errors,
)
from exert_ds.storage.base_model import base_model_difference
from exert_ds.storage.checkpoint_fields import (
    FIELDS,
    MOMENTS,
    TrainState,
    pack_sparse,
    pruned_base_weights,
    trainable_params,
    unpack_sparse,
)
from exert_ds.storage.checkpoint_schema import (
    ENGINE_SCALARS,
    ENGINE_TAG,
    FIELD_TABLE,
    FILES,
    FINGERPRINT,
    FORMAT,
    MICRO_BATCH,
    PARAMS,
    POSITION,
    RNG,
    TRAIN_BATCH_SIZE,
    TRAINABLE,
    WORLD_SIZE,
    RankField,
    assemble,
    is_engine_file_of,
    is_rank_engine_file,
    ranks_needed,
)
from exert_ds.storage.checkpoint_writer import WRITER
from exert_ds.storage.manifest import CHECKPOINT_FORMAT_VERSION as FORMAT_VERSION
from exert_ds.storage.manifest import CHECKPOINT_MANIFEST as MANIFEST
from exert_ds.storage.manifest import (
    LATEST,
    MANIFEST_DIGEST,
    complete_checkpoints,
    manifest_digest,
    sha256_file,
)
from exert_ds.storage.manifest import checkpoint_rank_file as rank_file
from exert_ds.storage.manifest import read_checkpoint_manifest as read_manifest

__all__ = [
    "LATEST",
    "MANIFEST",
    "TrainPosition",
    "load_checkpoint",
    "pack_sparse",
    "resolve_resume",
    "save_checkpoint",
    "unpack_sparse",
    "wait_for_checkpoint",
]


@dataclass(frozen=True)
class TrainPosition:
    """Where training stands: optimizer steps done, and micro-batches consumed in the current epoch."""

    step: int = 0
    epoch: int = 0
    micro: int = 0
    events_done: int = 0
    dense_perplexity: float | None = None  # measured before any training, kept for the final report
    allocation: list[float] | None = None  # prune.allocation owl: each block's sparsity at the target (PruneState)


def _engine_scalars(engine) -> dict:
    """World-size-free engine state: counters, scheduler, optimizer hyper-parameters and per-state scalars (copies:
    they are written after training has moved on)."""
    basic = engine.optimizer.optimizer
    first = next(iter(basic.state.values()), {})
    return copy.deepcopy(
        {
            "global_steps": engine.global_steps,
            "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps,
            "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in basic.param_groups],
            "state_scalars": {k: v for k, v in first.items() if k not in MOMENTS},
        }
    )


def _owned_engine_files(folder: Path, rank: int) -> list[Path]:
    """DeepSpeed's files that `rank` wrote (zero_pp_rank_R_*); rank 0 also takes the shared ones."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    mine = [p for p in files if is_engine_file_of(p.name, rank)]
    if rank == 0:
        mine += [p for p in files if not is_rank_engine_file(p.name) and p.parent != folder]
    return mine


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _manifest(
    engine, position: TrainPosition, fingerprint: str, fields: tuple[RankField, ...], base_model: dict | None
) -> dict:
    """Everything of the manifest but the file hashes (known once the background write is done)."""
    world = dist.get_world_size()
    return {
        FORMAT: FORMAT_VERSION,
        WORLD_SIZE: world,
        MICRO_BATCH: engine.train_micro_batch_size_per_gpu(),
        TRAIN_BATCH_SIZE: engine.train_batch_size(),
        POSITION: {k: v for k, v in asdict(position).items() if not (k == "allocation" and v is None)},  # as before OWL
        FINGERPRINT: fingerprint,
        "base_model": base_model,
        FIELD_TABLE: {field.key: field.table for field in fields},
        PARAMS: {
            n: {
                "shape": list(p.ds_shape),
                "dtype": str(p.ds_tensor.dtype),
                "ranges": [[r.start, r.end] for r in all_shard_ranges(tuple(p.ds_shape), world)],
            }
            for n, p in pruned_base_weights(engine.module).items()
        },
        TRAINABLE: {
            n: {
                "shape": list(p.ds_shape),
                "ranges": [[r.start, r.end] for r in all_shard_ranges(tuple(p.ds_shape), world)],
            }
            for n, p in trainable_params(engine.module).items()
        },
    }


def save_checkpoint(
    engine,
    ema: dict[str, Tensor],
    position: TrainPosition,
    root: Path,
    fingerprint: str,
    keep: int,
    base_model: dict | None = None,
    fields: tuple[RankField, ...] = FIELDS,
) -> Path:
    """Collective. Waits for the previous write (raising its failure, one line on every rank), saves DeepSpeed's
    engine state and copies this rank's fields to host memory, then returns while a background writer writes the
    files; rank 0 then writes the manifest, renames the folder into place and updates `latest`. Returns the final
    path, which exists once `wait_for_checkpoint()` has returned. `base_model`: base_model.base_model_fingerprint of
    the model's files, checked on resume. A write the OS refuses (full disk, quota, permissions) on any rank raises
    the same one line on every rank (here for DeepSpeed's synchronous part, at the next save or the end for the
    background part); `latest` still names the last complete checkpoint."""
    WRITER.wait()
    rank = dist.get_rank()
    name = f"step-{position.step:08d}-event-{position.events_done:03d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shared = SharedWrite(cleanup=(lambda: shutil.rmtree(tmp, ignore_errors=True)) if rank == 0 else None)
    if rank == 0:
        for partial in root.glob(".step-*.tmp"):  # left by a run killed while writing (only one run writes here)
            shutil.rmtree(partial, ignore_errors=True)
        with shared.catch(), write_errors(tmp):
            tmp.mkdir(parents=True)
    shared.share()
    with _recorded_engine_saves(engine, shared):
        engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    shared.share()
    state = TrainState(engine, ema)
    values = {field.key: field.save(state) for field in fields}  # device-to-host copies, synchronous
    rest = {RNG: _rng_state(), ENGINE_SCALARS: _engine_scalars(engine)}
    manifest = _manifest(engine, position, fingerprint, fields, base_model) if rank == 0 else None

    def write_files() -> list[Path]:
        coded = {f.key: {entry: f.encode(v) for entry, v in values[f.key].items()} for f in fields}
        values.clear()
        torch_save({**coded, **rest}, tmp / rank_file(rank))
        return [tmp / rank_file(rank), *_owned_engine_files(tmp, rank)]

    def publish_folder(hashes: dict[str, str]) -> None:
        write_manifest(tmp, {**manifest, FILES: hashes})
        publish(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        with write_errors(latest_tmp):
            latest_tmp.write_text(name)
        fsync_path(latest_tmp)
        with write_errors(root / LATEST):
            os.replace(latest_tmp, root / LATEST)
        fsync_path(root)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)

    WRITER.start(write_files, tmp, publish_folder, name, lambda: shutil.rmtree(tmp, ignore_errors=True))
    return final


def wait_for_checkpoint() -> None:
    """Collective: wait for the background write of the last checkpoint; its failure is raised on every rank."""
    WRITER.wait()


class _recorded_engine_saves:
    """While DeepSpeed writes its engine checkpoint, every write it makes (its checkpoint engine's `makedirs` and
    `save`, which goes through atomic.torch_save, and the copy of its recovery scripts) records a failure in `shared`
    instead of raising it: DeepSpeed then still reaches its closing barrier on this rank, and `shared.share()`
    raises the error on every rank afterwards. Any OSError counts here: the writes go into our own new folder."""

    def __init__(self, engine, shared: SharedWrite) -> None:
        self.engine, self.shared = engine, shared
        self.checkpoint_engine = engine.checkpoint_engine

    def _recorded(self, write: Callable[..., None]) -> Callable[..., None]:
        def call(path: str, *args, **kwargs) -> None:
            if self.shared.error is not None:  # after a refused write the next would fail alike
                return
            try:
                write(path, *args, **kwargs)
            except WriteError as err:
                self.shared.error = err
            except OSError as err:  # named by where it writes: a copy's error names its source file
                self.shared.error = write_error(path, OSError(err.errno, err.strerror))

        return call

    def __enter__(self) -> None:
        save = self._recorded(lambda path, state_dict: torch_save(state_dict, path))
        self.checkpoint_engine.save = lambda state_dict, path: save(path, state_dict)
        self.checkpoint_engine.makedirs = self._recorded(os.makedirs)
        self.engine._copy_recovery_script = self._recorded(self.engine._copy_recovery_script)

    def __exit__(self, *exc) -> None:
        for owner, name in ((self.checkpoint_engine, "save"), (self.checkpoint_engine, "makedirs")):
            del owner.__dict__[name]  # the class's own method again
        del self.engine.__dict__["_copy_recovery_script"]


def write_manifest(folder: Path, manifest: dict) -> None:
    """`folder/manifest.json` with its own sha256 in it, so that an altered manifest is found out too."""
    with write_errors(folder / MANIFEST):
        (folder / MANIFEST).write_text(json.dumps({**manifest, MANIFEST_DIGEST: manifest_digest(manifest)}, indent=1))


def _say(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # before any process group: the launcher's rank
        print(f"exert-ds: {text}", file=sys.stderr, flush=True)


def _auto_checkpoint(root: Path) -> Path | None:
    """What `--resume auto` resumes: the checkpoint `latest` names; when `latest` is damaged or names no complete
    checkpoint (or is missing beside complete ones), the newest complete checkpoint, said on stderr."""
    latest = root / LATEST
    complete = complete_checkpoints(root) if root.is_dir() else []
    if not latest.is_file() and not complete:
        return None
    why = "is missing"
    if latest.is_file():
        try:
            named = latest.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = ""
        if named and "/" not in named and (root / named / MANIFEST).is_file():
            return root / named  # its files are checked when it is read, and named if damaged
        why = f"is damaged (it names {named[:80]!r}, not a checkpoint)"
    if not complete:
        raise ConfigError(
            f"--resume auto: {latest} {why} and {root} holds no complete checkpoint; give --resume DIR or remove "
            f"{root} to start afresh"
        )
    _say(f"warning: {latest} {why}; resuming from the newest complete checkpoint, {complete[0]}")
    return complete[0]


def resolve_resume(root: Path, resume: str, fingerprint: str, base_model: dict | None = None) -> Path | None:
    """`auto`: the checkpoint `latest` names (or the newest complete one when `latest` is damaged), None when there
    is none; otherwise a checkpoint directory. Checks the manifest (intact, format, config fingerprint, base model
    files) here, before any process group starts."""
    if resume == "auto":
        path = _auto_checkpoint(root)
        if path is None:
            return None
    else:
        path = Path(resume)
        if not (path / MANIFEST).is_file():
            raise ConfigError(f"--resume {resume}: no {MANIFEST} in {path}; give a checkpoint directory or 'auto'")
    try:
        problem = _manifest_problem(path, read_manifest(path), fingerprint, base_model)
    except ConfigError as err:
        problem = str(err)
    if problem:
        raise ConfigError(f"--resume {resume}: {problem}")
    return path


def _manifest_problem(path: Path, manifest: dict, fingerprint: str, base_model: dict | None = None) -> str | None:
    if manifest.get(FINGERPRINT) != fingerprint:
        return f"{path / MANIFEST} was written by another run (config differs); resume with the config that wrote it"
    differs = base_model_difference(manifest.get("base_model"), base_model)
    if differs:
        return (
            f"the base weights at {base_model['path']} differ from those {path} was written from ({differs}); "
            "resume with the model files the run started from"
        )
    return None


def _damaged(file: Path) -> str:
    return f"{file} is missing, truncated or altered (sha256 differs from the manifest)"


def _check_file(path: Path, rel: str, manifest: dict) -> str | None:
    file = path / rel
    if rel not in manifest["files"]:
        return f"{file} is not in the manifest"
    if not file.is_file() or sha256_file(file) != manifest[FILES][rel]:
        return _damaged(file)
    return None


def _engine_files(manifest: dict, rank: int) -> list[str]:
    """The DeepSpeed files `rank` reads at the writing world size, from the manifest (not from the disk, so a
    deleted one is found): its zero_pp_rank_R_* files; rank 0 also the shared ones."""
    files = [rel for rel in manifest["files"] if rel.startswith(f"{ENGINE_TAG}/")]
    mine = [rel for rel in files if is_engine_file_of(rel, rank)]
    if rank == 0:
        mine += [rel for rel in files if not is_rank_engine_file(rel)]
    return mine


def _verify(
    path: Path, manifest: dict, rank: int, world: int, fingerprint: str, model: nn.Module, base_model: dict | None
) -> str | None:
    """None if the manifest belongs to this run and model and, at the writing world size, DeepSpeed's engine files
    this rank reads are intact, else a one-line reason. The rank files are verified as they are read
    (`_read_rank_files`)."""
    problem = _manifest_problem(path, manifest, fingerprint, base_model)
    if problem:
        return problem
    shapes = {n: list(p.ds_shape) for n, p in {**pruned_base_weights(model), **trainable_params(model)}.items()}
    saved = {n: e["shape"] for table in (manifest["params"], manifest["trainable"]) for n, e in table.items()}
    if saved != shapes:
        return f"{path / MANIFEST} lists other parameters or shapes than this model has (model or LoRA targets differ)"
    if manifest[WORLD_SIZE] != world:
        return None
    files = _engine_files(manifest, rank)
    if not files:
        return f"{path / MANIFEST} lists no DeepSpeed engine file of rank {rank}; the checkpoint is damaged"
    return next((problem for rel in files if (problem := _check_file(path, rel, manifest))), None)


READ_CHUNK = 1 << 24


def _mapped_sha256(file: Path) -> str:
    """sha256 of a file read through a memory map (its pages stay in the page cache for torch.load(mmap=True))."""
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return digest.hexdigest()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapped)
            try:
                for start in range(0, len(view), READ_CHUNK):
                    digest.update(view[start : start + READ_CHUNK])  # releases the GIL: files hash in parallel
            finally:
                view.release()
    return digest.hexdigest()


def _read_rank_files(
    path: Path, manifest: dict, ranks: list[int], fields: tuple[RankField, ...], model: nn.Module
) -> tuple[dict[str, dict], dict, str | None]:
    """Read the writing ranks' files `ranks`: each memory-mapped and hashed on a thread while this thread loads them
    (torch.load(mmap=True), the same pages) and assembles this rank's fragments. Returns (fragments per field, the
    lowest rank's RNG and engine scalars, None or a one-line problem); nothing is applied here."""
    rels = [rank_file(r) for r in ranks]
    for rel in rels:
        if rel not in manifest[FILES]:
            return {}, {}, f"{path / rel} is not in the manifest"
        if not (path / rel).is_file():
            return {}, {}, _damaged(path / rel)
    with ThreadPoolExecutor(max_workers=len(rels)) as pool:
        digests = {rel: pool.submit(_mapped_sha256, path / rel) for rel in rels}
        loaded, problem = {}, None
        try:
            files = {
                r: torch.load(path / rank_file(r), weights_only=False, mmap=True, map_location="cpu") for r in ranks
            }
            loaded = assemble(files, manifest, model, fields, dist.get_world_size(), dist.get_rank())
            rest = {RNG: files[ranks[0]][RNG], ENGINE_SCALARS: files[ranks[0]][ENGINE_SCALARS]}
        except KeyError as err:
            problem, rest = f"{path} has no field {err}; it was written without it", {}
        except Exception:  # noqa: BLE001 - a damaged file; the hash names it below
            problem, rest = f"{path / rels[0]} could not be read", {}
        bad = next((rel for rel in rels if digests[rel].result() != manifest[FILES][rel]), None)
    if bad:
        return {}, {}, _damaged(path / bad)
    return loaded, rest, problem


def _agree(problem: str | None) -> None:
    """Collective: raise the first rank's problem on every rank."""
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise ConfigError(first)


@torch.no_grad()
def replay_adam_step_counter(optimizer: torch.optim.Optimizer) -> None:
    """Walk DeepSpeed's CPU Adam kernels through the step counts already done, so a resumed run rounds as the
    uninterrupted one did.

    FusedAdam on the CPU accelerator and DeepSpeedCPUAdam (ZeRO-Offload) keep β₁ᵗ and β₂ᵗ in C++ state outside
    every state dict: advanced by one float multiplication per step, but recomputed with pow() when the step
    jumps — as it does on the first step after a load. The two differ in the last bit for some t (e.g. t = 3, 6),
    and then every later update is about one ulp off. Calling the kernel on empty tensors for steps 1..t repeats
    the uninterrupted run's sequence of multiplications (no element is touched). CUDA FusedAdam and torch's Adam
    compute βᵗ from the step each time and need nothing.
    """
    steps = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    if not steps or not optimizer.param_groups:
        return
    group, empty = optimizer.param_groups[0], torch.empty(0)
    hyper = (group["lr"], *group["betas"], group["eps"])
    if isinstance(optimizer, DeepSpeedCPUAdam):

        def kernel(step: int) -> None:
            optimizer.ds_opt_adam.adam_update(
                optimizer.opt_id, step, *hyper, group["weight_decay"], group["bias_correction"], *[empty] * 4
            )
    elif isinstance(optimizer, FusedAdam) and get_accelerator().device_name() == "cpu":

        def kernel(step: int) -> None:
            optimizer.multi_tensor_adam(
                1,
                optimizer._dummy_overflow_buf,
                [[empty]] * 4,
                *hyper,
                step,
                optimizer.adam_w_mode,
                int(group["bias_correction"]),
                group["weight_decay"],
            )
    else:
        return
    for step in range(1, max(steps) + 1):
        kernel(step)


def load_checkpoint(
    engine, path: Path, fingerprint: str, base_model: dict | None = None, fields: tuple[RankField, ...] = FIELDS
) -> tuple[TrainPosition, dict[str, Tensor]]:
    """Collective: verify, restore every field, the trainable state and RNG; returns the position and the EMA state.
    Every rank raises the same ConfigError if any rank's files are bad, before anything is restored.

    At the writing world size DeepSpeed's engine checkpoint restores the trainable state byte for byte and this rank's
    own file the other fields; at another one each rank reads the writing ranks' files that overlap its new ranges and
    every field (the trainable state included) is re-cut. The data position is kept as the same number of samples into
    the epoch (a re-cut needs the same train_batch_size); every rank takes the writing rank 0's RNG states then (all
    ranks are seeded alike and draw alike)."""
    WRITER.wait()
    rank, world = dist.get_rank(), dist.get_world_size()
    manifest = {}
    try:
        manifest = read_manifest(path)
        problem = _verify(path, manifest, rank, world, fingerprint, engine.module, base_model)
    except ConfigError as err:
        problem = str(err)
    _agree(problem)
    position = TrainPosition(**manifest[POSITION])
    same = manifest[WORLD_SIZE] == world
    if not same:
        position = _recut_position(engine, path, manifest, position)
    ranks = [rank] if same else ranks_needed(manifest, world, rank)
    used = tuple(f for f in fields if not (same and f.by_engine))
    loaded, rest, problem = _read_rank_files(path, manifest, ranks, used, engine.module)
    _agree(problem)
    state = TrainState(engine, engine_scalars=rest[ENGINE_SCALARS])
    if same:
        engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_module_strict=False)
    for field in used:
        field.restore(state, loaded[field.key])
    if not same:
        _restore_engine_scalars(engine, rest[ENGINE_SCALARS])
    replay_adam_step_counter(engine.optimizer.optimizer)
    _set_rng_state(rest[RNG])
    return position, state.ema


def _recut_position(engine, path: Path, manifest: dict, position: TrainPosition) -> TrainPosition:
    """The same number of samples into the epoch, in this world's micro-batches (one line if it cannot be)."""
    world, micro = dist.get_world_size(), engine.train_micro_batch_size_per_gpu()
    samples = position.micro * manifest[MICRO_BATCH] * manifest[WORLD_SIZE]
    if engine.train_batch_size() != manifest[TRAIN_BATCH_SIZE] or samples % (micro * world):
        raise ConfigError(
            f"{path} was written with train_batch_size {manifest[TRAIN_BATCH_SIZE]} on {manifest[WORLD_SIZE]} "
            f"ranks; this run has {engine.train_batch_size()} on {world}: keep the DeepSpeed train_batch_size "
            "(set it and train_micro_batch_size_per_gpu, leave gradient_accumulation_steps out) to change world size"
        )
    return replace(position, micro=samples // (micro * world))


def _restore_engine_scalars(engine, scalars: dict) -> None:
    """Counters, scheduler and optimizer hyper-parameters (world-size free) of a re-cut resume."""
    for group, saved in zip(engine.optimizer.optimizer.param_groups, scalars["param_groups"], strict=True):
        group.update(saved)
    if engine.lr_scheduler is not None and scalars["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(scalars["lr_scheduler"])
    engine.global_steps, engine.global_samples = scalars["global_steps"], scalars["global_samples"]
    engine.skipped_steps = scalars["skipped_steps"]
