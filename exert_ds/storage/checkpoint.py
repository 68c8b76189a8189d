"""Sharded, sparse, atomic training checkpoints (zero3.md "Checkpoints").

A checkpoint directory holds DeepSpeed's own engine checkpoint for the trainable state (LoRA, optimizer,
scheduler; frozen parameters excluded), one file per rank with that rank's partition of every pruned base
weight stored sparse (packed bitmask of non-zeros + their values), its EMA score partitions, RNG states and its
slice of the LoRA fp32 masters and Adam moments, and a manifest (world size, batch sizes, ranges, shapes, dtypes,
position, config fingerprint, base-model fingerprint (base_model.py), sha256 of every file, and its own sha256). It is written to a hidden temporary directory, fsynced and
renamed; `latest` is replaced last; the last K kept. At the writing world size a load restores every byte through
DeepSpeed; at another one each rank re-cuts the per-rank files through the manifest's ranges (`_load_recut`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from deepspeed.utils import (
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import Tensor, nn

from exert_ds.errors import ConfigError
from exert_ds.model.architecture import decoder_layers
from exert_ds.model.lora import block_lora_layers, lora_parts
from exert_ds.runtime.shard import all_shard_ranges
from exert_ds.runtime.zero3 import local_range, local_values, write_partition
from exert_ds.storage import sparse_codec
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
from exert_ds.storage.manifest import CHECKPOINT_FORMAT_VERSION as FORMAT_VERSION
from exert_ds.storage.manifest import CHECKPOINT_MANIFEST as MANIFEST
from exert_ds.storage.manifest import (
    LATEST,
    MANIFEST_DIGEST,
    checkpoint_rank_file,
    complete_checkpoints,
    manifest_digest,
    sha256_file,
)
from exert_ds.storage.manifest import read_checkpoint_manifest as read_manifest

ENGINE_TAG = "engine"
MOMENTS = ("exp_avg", "exp_avg_sq")  # the Adam family's per-element state


@dataclass(frozen=True)
class TrainPosition:
    """Where training stands: optimizer steps done, and micro-batches consumed in the current epoch."""

    step: int = 0
    epoch: int = 0
    micro: int = 0
    events_done: int = 0
    dense_perplexity: float | None = None  # measured before any training, kept for the final report


def pack_sparse(values: Tensor) -> dict[str, Tensor | int | torch.dtype]:
    """Non-zeros of a flat tensor in the expert's sparse storage (exert_ds/storage/sparse_codec.py: packed bitmask + kept
    values with their top byte 4-bit coded), so a checkpoint's base is as small as the final expert's."""
    flat = values.detach().reshape(-1)
    return {"numel": flat.numel(), "dtype": flat.dtype, **sparse_codec.encode(flat, sparse_codec.plan(flat))}


def unpack_sparse(packed: dict[str, Tensor | int | torch.dtype]) -> Tensor:
    out = torch.empty(int(packed["numel"]), dtype=packed["dtype"])
    sparse_codec.decode_into(out, packed.__getitem__)
    return out


def pruned_base_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """name → base weight of every LoRA-wrapped projection (the weights prune events change)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for block in range(len(decoder_layers(model))):
        for layer in block_lora_layers(model, block).values():
            weight = lora_parts(layer)[0]
            out[names[id(weight)]] = weight
    return out


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """name → every trained (LoRA) parameter."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def ema_keys(model: nn.Module) -> dict[str, str]:
    """PruneState EMA key (block.role) → name of the base weight whose elements it scores."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        f"{block}.{role}": names[id(lora_parts(layer)[0])]
        for block in range(len(decoder_layers(model)))
        for role, layer in block_lora_layers(model, block).items()
    }


def _moment(param: nn.Parameter, key: str) -> Tensor | None:
    try:
        return safe_get_local_optimizer_state(param, key)
    except KeyError:  # no optimizer step yet: Adam creates its state lazily
        return None


def _trainable_state(engine) -> dict:
    """This rank's valid slice of every LoRA parameter's fp32 master and Adam moments, by name: what a resume at
    another world size re-cuts (DeepSpeed's own files hold them in a per-world flat layout)."""
    out = {}
    for name, param in trainable_params(engine.module).items():
        valid = local_range(param).valid
        entry = {"fp32": safe_get_local_fp32_param(param).reshape(-1)[:valid].cpu().clone()}
        for key in MOMENTS:
            moment = _moment(param, key)
            if moment is not None:
                entry[key] = moment.reshape(-1)[:valid].cpu().clone()
        out[name] = entry
    return out


def _engine_scalars(engine) -> dict:
    """World-size-free engine state: counters, scheduler, optimizer hyper-parameters and per-state scalars."""
    basic = engine.optimizer.optimizer
    first = next(iter(basic.state.values()), {})
    return {
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in basic.param_groups],
        "state_scalars": {k: v for k, v in first.items() if k not in MOMENTS},
    }


def _owned_engine_files(folder: Path, rank: int) -> list[Path]:
    """DeepSpeed's files that `rank` wrote (zero_pp_rank_R_*); rank 0 also takes the shared ones."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    mine = [p for p in files if f"zero_pp_rank_{rank}_" in p.name]
    if rank == 0:
        mine += [p for p in files if "zero_pp_rank_" not in p.name and p.parent != folder]
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


def save_checkpoint(
    engine,
    ema: dict[str, Tensor],
    position: TrainPosition,
    root: Path,
    fingerprint: str,
    keep: int,
    base_model: dict | None = None,
) -> Path:
    """Collective: every rank writes its files; rank 0 writes the manifest, renames, updates `latest`.
    `base_model`: base_model.base_model_fingerprint of the model's files, checked on resume. A write the OS refuses
    (full disk, quota, permissions) on any rank raises the same WriteError on every rank; the partial folder is
    removed and `latest` still names the last complete checkpoint."""
    rank, world = dist.get_rank(), dist.get_world_size()
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
    weights = pruned_base_weights(engine.module)
    base = {
        "weights": {n: pack_sparse(local_values(p)) for n, p in weights.items()},
        "ema": {k: v.cpu() for k, v in ema.items()},
        "rng": _rng_state(),
        "trainable": _trainable_state(engine),
        "engine": _engine_scalars(engine),
    }
    with shared.catch():
        torch_save(base, tmp / checkpoint_rank_file(rank))
    shared.share()  # all files are written
    mine = [tmp / checkpoint_rank_file(rank), *_owned_engine_files(tmp, rank)]
    hashes = {}
    with shared.catch():
        for path in mine:
            fsync_path(path)
            hashes[str(path.relative_to(tmp))] = sha256_file(path)
    shared.share()
    gathered: list[dict] = [None] * world
    dist.all_gather_object(gathered, hashes)
    if rank == 0:
        manifest = {
            "format": FORMAT_VERSION,
            "world_size": world,
            "micro_batch": engine.train_micro_batch_size_per_gpu(),
            "train_batch_size": engine.train_batch_size(),
            "position": asdict(position),
            "config_fingerprint": fingerprint,
            "base_model": base_model,
            "params": {
                n: {
                    "shape": list(p.ds_shape),
                    "dtype": str(p.ds_tensor.dtype),
                    "ranges": [[r.start, r.end] for r in all_shard_ranges(tuple(p.ds_shape), world)],
                }
                for n, p in weights.items()
            },
            "trainable": {
                n: {
                    "shape": list(p.ds_shape),
                    "ranges": [[r.start, r.end] for r in all_shard_ranges(tuple(p.ds_shape), world)],
                }
                for n, p in trainable_params(engine.module).items()
            },
            "files": {k: v for part in gathered for k, v in part.items()},
        }
        with shared.catch():
            write_manifest(tmp, manifest)
            publish(tmp, final)
            latest_tmp = root / f".{LATEST}.tmp"
            with write_errors(latest_tmp):
                latest_tmp.write_text(name)
            fsync_path(latest_tmp)
            with write_errors(root / LATEST):
                os.replace(latest_tmp, root / LATEST)
            fsync_path(root)
        if shared.error is None:
            for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
                shutil.rmtree(old)
    shared.share()
    return final


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
            except OSError as err:
                self.shared.error = write_error(path, err)

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
    if manifest.get("config_fingerprint") != fingerprint:
        return f"{path / MANIFEST} was written by another run (config differs); resume with the config that wrote it"
    differs = base_model_difference(manifest.get("base_model"), base_model)
    if differs:
        return (
            f"the base weights at {base_model['path']} differ from those {path} was written from ({differs}); "
            "resume with the model files the run started from"
        )
    return None


def _check_file(path: Path, rel: str, manifest: dict) -> str | None:
    file = path / rel
    if rel not in manifest["files"]:
        return f"{file} is not in the manifest"
    if not file.is_file() or sha256_file(file) != manifest["files"][rel]:
        return f"{file} is missing, truncated or altered (sha256 differs from the manifest)"
    return None


def _engine_files(manifest: dict, rank: int) -> list[str]:
    """The DeepSpeed files `rank` reads at the writing world size, from the manifest (not from the disk, so a
    deleted one is found): its zero_pp_rank_R_* files; rank 0 also the shared ones."""
    files = [rel for rel in manifest["files"] if rel.startswith(f"{ENGINE_TAG}/")]
    mine = [rel for rel in files if f"zero_pp_rank_{rank}_" in rel]
    if rank == 0:
        mine += [rel for rel in files if "zero_pp_rank_" not in rel]
    return mine


def _old_ranks_needed(manifest: dict, model: nn.Module, world: int, rank: int) -> list[int]:
    """The writing ranks whose flat ranges overlap this rank's new range of any saved parameter."""
    needed = set()
    for table in (manifest["params"], manifest["trainable"]):
        for entry in table.values():
            new = all_shard_ranges(tuple(entry["shape"]), world)[rank]
            needed |= {r for r, (lo, hi) in enumerate(entry["ranges"]) if max(lo, new.start) < min(hi, new.end)}
    return sorted(needed | {0})  # rank 0's file also holds the engine scalars and the RNG every rank takes


def _verify(
    path: Path, manifest: dict, rank: int, world: int, fingerprint: str, model: nn.Module, base_model: dict | None
) -> str | None:
    """None if every file this rank reads is intact and belongs to this run, else a one-line reason. Checked before
    anything is read: the rank files and, at the writing world size, DeepSpeed's engine files."""
    problem = _manifest_problem(path, manifest, fingerprint, base_model)
    if problem:
        return problem
    shapes = {n: list(p.ds_shape) for n, p in {**pruned_base_weights(model), **trainable_params(model)}.items()}
    saved = {n: e["shape"] for table in (manifest["params"], manifest["trainable"]) for n, e in table.items()}
    if saved != shapes:
        return f"{path / MANIFEST} lists other parameters or shapes than this model has (model or LoRA targets differ)"
    if manifest["world_size"] == world:
        files = [checkpoint_rank_file(rank), *_engine_files(manifest, rank)]
        if len(files) == 1:
            return f"{path / MANIFEST} lists no DeepSpeed engine file of rank {rank}; the checkpoint is damaged"
    else:
        files = [checkpoint_rank_file(r) for r in _old_ranks_needed(manifest, model, world, rank)]
    return next((problem for rel in files if (problem := _check_file(path, rel, manifest))), None)


def _recut(fragments: dict[int, Tensor], ranges: list[list[int]], lo: int, hi: int) -> Tensor:
    """Flat elements [lo, hi) assembled from the writing ranks' slices (`fragments[r]` holds ranges[r])."""
    parts = [
        fragments[r][max(lo, a) - a : min(hi, b) - a] for r, (a, b) in enumerate(ranges) if max(lo, a) < min(hi, b)
    ]
    return torch.cat(parts) if parts else torch.empty(0)


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
    engine, path: Path, fingerprint: str, base_model: dict | None = None
) -> tuple[TrainPosition, dict[str, Tensor]]:
    """Collective: verify, restore the trainable state, the sparse base partitions, RNG; returns the position
    and the EMA state. Every rank raises the same ConfigError if any rank's files are bad.

    At the writing world size DeepSpeed's engine checkpoint restores the trainable state byte for byte; at another
    one every per-rank file is re-cut through the manifest's ranges (`_load_recut`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        manifest = read_manifest(path)
        problem = _verify(path, manifest, rank, world, fingerprint, engine.module, base_model)
    except ConfigError as err:
        problem = str(err)
    problems: list[str | None] = [None] * world
    dist.all_gather_object(problems, problem)
    problem = next((p for p in problems if p), None)
    if problem:
        raise ConfigError(problem)
    position = TrainPosition(**manifest["position"])
    if manifest["world_size"] != world:
        return _load_recut(engine, path, manifest, position)
    engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_module_strict=False)
    replay_adam_step_counter(engine.optimizer.optimizer)
    base = torch.load(path / checkpoint_rank_file(rank), weights_only=False)
    for name, param in pruned_base_weights(engine.module).items():
        write_partition(param, unpack_sparse(base["weights"][name]).to(param.ds_tensor.device))
    _set_rng_state(base["rng"])
    return position, base["ema"]


def _padded(param: nn.Parameter, values: Tensor) -> Tensor:
    out = torch.zeros(param.ds_tensor.numel(), dtype=torch.float32, device=param.ds_tensor.device)
    out[: values.numel()] = values
    return out


@torch.no_grad()
def _load_recut(engine, path: Path, manifest: dict, position: TrainPosition) -> tuple[TrainPosition, dict[str, Tensor]]:
    """Resume at another world size. Each rank loads (memory-mapped) only the writing ranks' files whose ranges
    overlap its own and assembles its new partition of every base weight, EMA score, LoRA fp32 master and Adam
    moment from their fragments; the engine's counters, scheduler and optimizer hyper-parameters are world-size
    free. The data position is kept as the same number of samples into the epoch (the run needs the same
    train_batch_size). Every rank takes writing rank 0's RNG states: all ranks are seeded alike and draw alike."""
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = engine.train_micro_batch_size_per_gpu()
    samples = position.micro * manifest["micro_batch"] * manifest["world_size"]
    if engine.train_batch_size() != manifest["train_batch_size"] or samples % (micro * world):
        raise ConfigError(
            f"{path} was written with train_batch_size {manifest['train_batch_size']} on {manifest['world_size']} "
            f"ranks; this run has {engine.train_batch_size()} on {world}: keep the DeepSpeed train_batch_size "
            "(set it and train_micro_batch_size_per_gpu, leave gradient_accumulation_steps out) to change world size"
        )
    files = {
        r: torch.load(path / checkpoint_rank_file(r), weights_only=False, mmap=True, map_location="cpu")
        for r in _old_ranks_needed(manifest, engine.module, world, rank)
    }
    for name, param in pruned_base_weights(engine.module).items():
        rng, ranges = local_range(param), manifest["params"][name]["ranges"]
        fragments = {r: unpack_sparse(f["weights"][name]) for r, f in files.items()}
        write_partition(param, _recut(fragments, ranges, rng.start, rng.end).to(param.ds_tensor.device))
    ema = {}
    for key, name in ema_keys(engine.module).items():
        if key in files[0]["ema"]:
            ranges = manifest["params"][name]["ranges"]
            rng = all_shard_ranges(tuple(manifest["params"][name]["shape"]), world)[rank]
            ema[key] = _recut({r: f["ema"][key] for r, f in files.items()}, ranges, rng.start, rng.end).clone()
    scalars = files[0]["engine"]
    basic = engine.optimizer.optimizer
    trained = trainable_params(engine.module)
    has_moments = all(k in files[0]["trainable"][next(iter(trained))] for k in MOMENTS)
    if has_moments:  # Adam's state is created lazily at the first step: create it as the optimizer would
        for flat in engine.optimizer.fp32_partitioned_groups_flat:
            basic.state[flat] = {**scalars["state_scalars"], **{k: torch.zeros_like(flat) for k in MOMENTS}}
    for name, param in trained.items():
        rng, ranges = local_range(param), manifest["trainable"][name]["ranges"]

        keys = ("fp32", *(MOMENTS if has_moments else ()))
        piece = {
            k: _recut({r: f["trainable"][name][k] for r, f in files.items()}, ranges, rng.start, rng.end) for k in keys
        }
        write_partition(param, piece["fp32"].to(param.ds_tensor.device))
        safe_set_local_fp32_param(param, _padded(param, piece["fp32"]))
        for key in keys[1:]:
            safe_set_local_optimizer_state(param, _padded(param, piece[key]), key)
    for group, saved in zip(basic.param_groups, scalars["param_groups"], strict=True):
        group.update(saved)
    if engine.lr_scheduler is not None and scalars["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(scalars["lr_scheduler"])
    engine.global_steps, engine.global_samples = scalars["global_steps"], scalars["global_samples"]
    engine.skipped_steps = scalars["skipped_steps"]
    replay_adam_step_counter(basic)
    _set_rng_state(files[0]["rng"])
    return replace(position, micro=samples // (micro * world)), ema
