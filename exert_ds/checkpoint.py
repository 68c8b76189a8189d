"""Sharded, sparse, atomic training checkpoints (zero3.md "Checkpoints").

A checkpoint directory holds DeepSpeed's own engine checkpoint for the trainable state (LoRA, optimizer,
scheduler; frozen parameters excluded), one file per rank with that rank's partition of every pruned base
weight stored sparse (packed bitmask of non-zeros + their values), its EMA score partitions and RNG states,
and a manifest (world size, ranges, shapes, dtypes, position, config fingerprint, sha256 of every file).
It is written to a hidden temporary directory, fsynced and renamed; `latest` is replaced last; the last K kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from torch import Tensor, nn

from exert_ds.architecture import decoder_layers
from exert_ds.config import ConfigError
from exert_ds.lora import block_lora_layers, lora_parts
from exert_ds.shard import all_shard_ranges
from exert_ds.zero3 import local_values, write_partition

MANIFEST = "manifest.json"
LATEST = "latest"
ENGINE_TAG = "engine"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainPosition:
    """Where training stands: optimizer steps done, and micro-batches consumed in the current epoch."""

    step: int = 0
    epoch: int = 0
    micro: int = 0
    events_done: int = 0
    dense_perplexity: float | None = None  # measured before any training, kept for the final report


def pack_sparse(values: Tensor) -> dict[str, Tensor | int]:
    """Non-zeros of a flat tensor: a packed bitmask (1 bit per element) and the kept values in order."""
    flat = values.detach().reshape(-1).cpu()
    keep = flat != 0
    return {"mask": torch.from_numpy(np.packbits(keep.numpy())), "values": flat[keep].clone(), "numel": flat.numel()}


def unpack_sparse(packed: dict[str, Tensor | int]) -> Tensor:
    keep = np.unpackbits(packed["mask"].numpy(), count=int(packed["numel"])).astype(bool)
    out = torch.zeros(int(packed["numel"]), dtype=packed["values"].dtype)
    out[torch.from_numpy(keep)] = packed["values"]
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rank_file(rank: int) -> str:
    return f"base-rank{rank:05d}.pt"


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
    engine, ema: dict[str, Tensor], position: TrainPosition, root: Path, fingerprint: str, keep: int
) -> Path:
    """Collective: every rank writes its files; rank 0 writes the manifest, renames, updates `latest`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    name = f"step-{position.step:08d}-event-{position.events_done:03d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    weights = pruned_base_weights(engine.module)
    base = {
        "weights": {n: pack_sparse(local_values(p)) for n, p in weights.items()},
        "ema": {k: v.cpu() for k, v in ema.items()},
        "rng": _rng_state(),
    }
    torch.save(base, tmp / _rank_file(rank))
    dist.barrier()  # all files are written
    mine = [tmp / _rank_file(rank), *_owned_engine_files(tmp, rank)]
    hashes = {}
    for path in mine:
        _fsync(path)
        hashes[str(path.relative_to(tmp))] = _sha256(path)
    gathered: list[dict] = [None] * world
    dist.all_gather_object(gathered, hashes)
    if rank == 0:
        manifest = {
            "format": FORMAT_VERSION,
            "world_size": world,
            "position": asdict(position),
            "config_fingerprint": fingerprint,
            "params": {
                n: {
                    "shape": list(p.ds_shape),
                    "dtype": str(p.ds_tensor.dtype),
                    "ranges": [[r.start, r.end] for r in all_shard_ranges(tuple(p.ds_shape), world)],
                }
                for n, p in weights.items()
            },
            "files": {k: v for part in gathered for k, v in part.items()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(root)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(name)
        _fsync(latest_tmp)
        os.replace(latest_tmp, root / LATEST)
        _fsync(root)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def resolve_resume(root: Path, resume: str) -> Path | None:
    """`auto`: the checkpoint `latest` names, or None when there is none; otherwise a checkpoint directory."""
    if resume == "auto":
        latest = root / LATEST
        return root / latest.read_text().strip() if latest.is_file() else None
    path = Path(resume)
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"--resume {resume}: no {MANIFEST} there; give a checkpoint directory or 'auto'")
    return path


def _verify(path: Path, manifest: dict, rank: int, world: int, fingerprint: str) -> str | None:
    """None if this rank's files are intact and belong to this run, else a one-line reason."""
    if manifest.get("config_fingerprint") != fingerprint:
        return f"{path / MANIFEST} was written by another run (config differs); resume with the config that wrote it"
    if manifest["world_size"] != world:
        return (
            f"{path} was written by {manifest['world_size']} ranks, this run has {world}; resuming at another "
            "world size is not implemented yet"
        )
    for rel in [_rank_file(rank), *(str(p.relative_to(path)) for p in _owned_engine_files(path, rank))]:
        file = path / rel
        if rel not in manifest["files"]:
            return f"{file} is not in the manifest"
        if not file.is_file() or _sha256(file) != manifest["files"][rel]:
            return f"{file} is missing, truncated or altered (sha256 differs from the manifest)"
    return None


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


def load_checkpoint(engine, path: Path, fingerprint: str) -> tuple[TrainPosition, dict[str, Tensor]]:
    """Collective: verify, restore DeepSpeed's trainable state, the sparse base partitions, RNG; returns the
    position and the EMA state. Every rank raises the same ConfigError if any rank's files are bad."""
    rank, world = dist.get_rank(), dist.get_world_size()
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise ConfigError(f"{manifest_file} is missing; {path} is not a complete checkpoint")
    manifest = json.loads(manifest_file.read_text())
    problems: list[str | None] = [None] * world
    dist.all_gather_object(problems, _verify(path, manifest, rank, world, fingerprint))
    problem = next((p for p in problems if p), None)
    if problem:
        raise ConfigError(problem)
    engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_module_strict=False)
    replay_adam_step_counter(engine.optimizer.optimizer)
    base = torch.load(path / _rank_file(rank), weights_only=False)
    for name, param in pruned_base_weights(engine.module).items():
        write_partition(param, unpack_sparse(base["weights"][name]).to(param.ds_tensor.device))
    _set_rng_state(base["rng"])
    return TrainPosition(**manifest["position"]), base["ema"]
