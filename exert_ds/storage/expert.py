"""The sparse expert (zero3.md "The sparse expert"): the final merged, pruned weights, written by every rank in
parallel, and read back one full tensor at a time.

Layout of an expert directory:
- `expert-rank0000R-of-0000W.safetensors`: rank R's ZeRO-3 partition (flat, valid elements only) of every base
  parameter. The pruned projections are stored sparse (sparse_codec.py: `<name>.mask`, a packed bitmask of the
  non-zeros, and their values with the top byte 4-bit coded); everything else dense, `<name>.dense`.
- `config.json` and the tokenizer files, as `save_pretrained` writes them.
- `expert_manifest.json`: world size; per tensor its Hugging Face name, shape, dtype, storage, the flat range
  each rank holds, its role and the zeros per row the prune schedule promised; sha256 of every other file.
Written into a hidden temporary directory, fsynced and renamed, like a training checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import deepspeed.comm as dist
import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from exert_ds.errors import ConfigError
from exert_ds.model.architecture import block_linears, decoder_layers, unwrap
from exert_ds.prune.pattern import pruned_per_row
from exert_ds.runtime.shard import all_shard_ranges
from exert_ds.storage import sparse_codec
from exert_ds.storage.atomic import SharedWrite, publish, temporary_sibling, write_errors
from exert_ds.storage.manifest import EXPERT_FORMAT as FORMAT
from exert_ds.storage.manifest import EXPERT_FORMAT_VERSION as FORMAT_VERSION
from exert_ds.storage.manifest import EXPERT_MANIFEST as MANIFEST
from exert_ds.storage.manifest import MANIFEST_DIGEST, damage_line, damaged_files, manifest_digest, sha256_file
from exert_ds.storage.manifest import expert_rank_file as rank_file
from exert_ds.storage.manifest import read_expert_manifest as read_manifest
from exert_ds.storage.safetensors_stream import SafetensorsStream

CHUNK = 1 << 24  # elements per row block when checking the promise
DENSE_CHUNK = 1 << 22  # elements copied at a time from a dense fragment


def base_parameter_name(peft_name: str) -> str:
    """`base_model.model.model.layers.0.mlp.up_proj.base_layer.weight` → `model.layers.0.mlp.up_proj.weight`."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shape(param: nn.Parameter) -> tuple[int, ...]:
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


def _local_values(param: nn.Parameter) -> Tensor:
    """This rank's valid flat partition (ZeRO-3), or the whole parameter in a plain single process."""
    if hasattr(param, "ds_tensor"):
        from exert_ds.runtime.zero3 import local_values

        return local_values(param)
    return param.detach().reshape(-1)


def pruned_weights(model: nn.Module) -> dict[int, tuple[int, str]]:
    """id(base weight) → (block, role), for the seven projections of every block (LoRA-wrapped or not)."""
    found = {}
    for block in range(len(decoder_layers(model))):
        for role, module in block_linears(model, block).items():
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            found[id(base.weight)] = (block, role)
    return found


def pruned_roles(model: nn.Module) -> dict[int, str]:
    """id(base weight) → role, for the seven projections of every block (LoRA-wrapped or not)."""
    return {key: role for key, (_, role) in pruned_weights(model).items()}


def _promise(
    where: tuple[int, str] | None, shape: tuple[int, ...], sparsity: float | list[float], n: int, m: int
) -> dict:
    """A tensor's manifest entry: dense, or sparse with the zeros per row its block's sparsity promises."""
    if where is None:
        return {"storage": "dense"}
    block, role = where
    p = sparsity[block] if isinstance(sparsity, list) else sparsity
    return {"storage": "sparse", "role": role, "zeros_per_row": pruned_per_row(p, shape[-1], n, m)}


@torch.no_grad()
def write_expert(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    sparsity: float = 0.0,
    n: int = 0,
    m: int = 0,
    base_model: dict | None = None,
    block_sparsity: list[float] | None = None,
) -> Path:
    """Collective under ZeRO-3 (also a plain single process): each rank streams its partition of every base
    parameter (LoRA excluded: B = 0 after the final event, so the base weights are the merged model) into its own
    file; rank 0 adds config, tokenizer and the manifest. `sparsity` (or N:M `n`, `m`) is what the schedule
    promised: every pruned row must hold at least `pruned_per_row(...)` zeros, which readers check. `base_model`
    (base_model.base_model_fingerprint of the files it was trained from) is kept in the manifest as provenance.
    `block_sparsity` (prune.allocation owl: one sparsity per decoder block, mean `sparsity`) promises each block's
    own, and the manifest's promise lists them as "blocks".
    A write the OS refuses on any rank raises the same WriteError on every rank, and nothing is left behind."""
    rank, world = _rank_world()
    out = Path(out_dir)
    tmp = temporary_sibling(out)
    shared = SharedWrite(cleanup=(lambda: shutil.rmtree(tmp, ignore_errors=True)) if rank == 0 else None)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        with shared.catch(), write_errors(tmp):
            tmp.mkdir(parents=True)
    shared.share()
    roles = pruned_weights(model)
    promised = sparsity if block_sparsity is None else list(block_sparsity)
    params = [(base_parameter_name(n_), p) for n_, p in model.named_parameters() if "lora_" not in n_]
    specs, tensors, layouts = [], {}, {}
    for name, param in params:  # pass 1: sizes (non-zero counts), so the header can be written first
        local = _local_values(param)
        entry = {"shape": list(_shape(param)), "dtype": str(local.dtype).removeprefix("torch.")}
        entry |= _promise(roles.get(id(param)), _shape(param), promised, n, m)
        if entry["storage"] == "sparse":
            layouts[name] = sparse_codec.plan(local)
            specs += [(f"{name}.{key}", dtype, shape) for key, dtype, shape in sparse_codec.specs(layouts[name])]
        else:
            specs += [(f"{name}.dense", local.dtype, (local.numel(),))]
        entry["ranges"] = [[r.start, r.end] for r in all_shard_ranges(_shape(param), world)]
        tensors[name] = entry
    hashes: dict[str, str | None] = {}
    with shared.catch(), write_errors(tmp / rank_file(rank, world)):  # pass 2: the bytes
        stream = SafetensorsStream(
            tmp / rank_file(rank, world), specs, {"format": "pt", "exert_ds": FORMAT}, digest=True
        )
        for name, param in tqdm(params, desc="write expert", unit="tensor", disable=rank != 0):
            local = _local_values(param)
            if name in layouts:
                for key, piece in sparse_codec.encode(local, layouts[name]).items():
                    stream.write(f"{name}.{key}", piece)
            else:
                stream.write(f"{name}.dense", local)
        hashes[rank_file(rank, world)] = stream.close()
    if rank == 0:
        with shared.catch(), write_errors(tmp):
            unwrap(model).config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            hashes |= {p.name: sha256_file(p) for p in tmp.iterdir() if p.is_file() and p.name not in hashes}
    shared.share()
    gathered: list[dict] = [hashes] * world
    if dist.is_initialized():
        dist.all_gather_object(gathered, hashes)
    if rank == 0:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "world_size": world,
            "promise": {"sparsity": sparsity, "n": n, "m": m}
            | ({} if block_sparsity is None else {"blocks": list(block_sparsity)}),
            "base_model": base_model,
            "tensors": tensors,
            "files": {k: v for part in gathered for k, v in sorted(part.items())},
        }
        with shared.catch():
            write_manifest(tmp, manifest)
            publish(tmp, out)
    shared.share()
    return out


def write_manifest(folder: Path, manifest: dict) -> None:
    """`folder/expert_manifest.json` with its own sha256 in it, so that an altered manifest is found out too."""
    with write_errors(folder / MANIFEST):
        (folder / MANIFEST).write_text(json.dumps({**manifest, MANIFEST_DIGEST: manifest_digest(manifest)}, indent=1))


def verify_files(path: str | Path, manifest: dict) -> None:
    """One-line ConfigError naming the first missing, truncated or altered file."""
    bad = damaged_files(path, manifest)
    if bad:
        raise ConfigError(damage_line(path, bad))


def check_promise(path: Path, name: str, weight: Tensor, entry: dict, pattern: tuple[int, int]) -> None:
    """ConfigError naming the tensor and the first row with fewer zeros than promised (per N:M group for N:M)."""
    need = entry["zeros_per_row"]
    if not need:
        return
    n, m = pattern
    bits = sparse_codec.bits_view(weight.reshape(-1)).reshape(weight.shape)  # stored zeros are +0: all bits 0
    rows_per_chunk = max(1, CHUNK // weight.shape[-1])
    for first in range(0, weight.shape[0], rows_per_chunk):
        block = bits[first : first + rows_per_chunk]
        if m:
            zeros = np.count_nonzero(block.reshape(block.shape[0], -1, m) == 0, axis=-1)
            short = (zeros < n).any(-1)
            what = f"fewer than {n} zeros in a group of {m}"
        else:
            zeros = np.count_nonzero(block == 0, axis=-1)
            short = zeros < need
            what = "{} zeros, fewer than the {} promised"
        if short.any():
            row = int(np.flatnonzero(short)[0])
            if not m:
                what = what.format(int(zeros[row]), need)
            raise ConfigError(
                f"{path}: {name} row {first + row} has {what} (the prune schedule's sparsity); "
                "this expert is not the pruned model"
            )


def expert_tensors(path: str | Path, verify: bool = True) -> Iterator[tuple[str, Tensor]]:
    """(Hugging Face parameter name, full tensor), one at a time, assembled from the rank files; host memory about
    twice the largest tensor (the tensor, plus the mapped pages of the fragment being read). With `verify`, every
    file's sha256 is checked before anything is read, and every pruned matrix's zeros per row against the promise."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    yield from assemble(path, manifest, check=verify)


def _read_fragment(file: Path, name: str, storage: str, out: Tensor) -> None:
    """One rank's fragment of one tensor into `out`. The file is memory-mapped only inside this call: its touched
    pages count in the reader's RSS until the mapping goes, so it goes before the next tensor is allocated."""
    with safe_open(file, framework="pt") as fh:
        if storage == "sparse":
            sparse_codec.decode_into(out, lambda key: fh.get_slice(f"{name}.{key}"))
            return
        stored = fh.get_slice(f"{name}.dense")
        for at in range(0, out.numel(), DENSE_CHUNK):  # chunked: no second full copy
            out[at : at + DENSE_CHUNK] = stored[at : at + DENSE_CHUNK]


def read_tensor(path: Path, manifest: dict, name: str, check: bool = True) -> Tensor:
    """The full tensor `name` (Hugging Face name, a key of the manifest's `tensors`), assembled from the rank files
    without a sha256 pass (the caller ran verify_files); `check`: its zeros per row against the promise."""
    entry = manifest["tensors"].get(name)
    if entry is None:
        raise ConfigError(f"{path / MANIFEST} lists no tensor {name}; the expert does not hold it")
    shape, world = tuple(entry["shape"]), manifest["world_size"]
    flat = torch.empty(int(np.prod(shape, dtype=np.int64)), dtype=getattr(torch, entry["dtype"]))
    for rank, (start, end) in enumerate(entry["ranges"]):
        if start < end:
            _read_fragment(path / rank_file(rank, world), name, entry["storage"], flat[start:end])
    weight = flat.view(shape)
    if check and entry["storage"] == "sparse":
        check_promise(path, name, weight, entry, (manifest["promise"]["n"], manifest["promise"]["m"]))
    return weight


def assemble(
    path: Path, manifest: dict, check: bool = True, names: Iterable[str] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """expert_tensors without the sha256 pass (for a caller that ran verify_files itself), in the order of `names`
    (default: the manifest's); `check`: the promise. One tensor alive at a time."""
    for name in manifest["tensors"] if names is None else names:
        weight = read_tensor(path, manifest, name, check)
        yield name, weight
        del weight  # before the next tensor is allocated: the caller holds the only reference now
