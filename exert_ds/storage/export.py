"""`exert-ds export`: stream a sparse expert into a Hugging Face directory that stock `from_pretrained` loads.

One process, one tensor at a time: the shard plan (huggingface_hub's own splitter, so the names and index are
Hugging Face's: `model.safetensors` when it fits one shard, else `model-0000k-of-0000n.safetensors` and
`model.safetensors.index.json`) comes from the manifest's shapes alone, every shard's header is written first and
each tensor's bytes follow as `expert_tensors` assembles it, checked against its sha256 and sparsity promise.
Host memory grows by about twice the largest tensor (the assembled tensor, plus the memory-mapped pages of the
fragment being read), whatever the model size.

`--ckpt` takes an expert directory or a run's output directory (its `expert/`). A training checkpoint is not an
expert: its LoRA is not merged yet and its dense frozen weights live in the original model, so it is refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from huggingface_hub.serialization._base import parse_size_to_int
from tqdm.auto import tqdm

from exert_ds.errors import ConfigError
from exert_ds.storage.atomic import publish, temporary_sibling, write_errors
from exert_ds.storage.checkpoint_schema import MANIFEST as CHECKPOINT_MANIFEST
from exert_ds.storage.expert import MANIFEST, assemble, is_expert_dir, rank_file, read_manifest, verify_files
from exert_ds.storage.safetensors_stream import SafetensorsStream, nbytes

INDEX = "model.safetensors.index.json"


def resolve_expert(path: str | Path) -> Path:
    """The expert directory `path` names: itself, or `path/expert` for a run's output directory."""
    path = Path(path)
    for candidate in (path, path / "expert"):
        if is_expert_dir(candidate):
            return candidate
    if (path / CHECKPOINT_MANIFEST).is_file():
        raise ConfigError(
            f"--ckpt {path} is a training checkpoint (LoRA not merged); export the expert a run writes at its end "
            "(output_dir/expert), or resume the run to its end"
        )
    raise ConfigError(f"--ckpt {path}: no {MANIFEST} there or in {path / 'expert'}; give an expert directory")


def parse_shard_size(text: str | int) -> int:
    try:
        size = text if isinstance(text, int) else parse_size_to_int(text)
    except ValueError as err:
        raise ConfigError(f"--max-shard-size {text!r}: give a size like 5GB or 500MB ({err})") from err
    if size <= 0:
        raise ConfigError(f"--max-shard-size {text!r} must be positive")
    return size


def _side_files(expert: Path, manifest: dict) -> list[Path]:
    """config.json, tokenizer files and anything else save_pretrained wrote: every file but the rank files."""
    ranks = {rank_file(r, manifest["world_size"]) for r in range(manifest["world_size"])}
    return [expert / name for name in manifest["files"] if name not in ranks]


def export_expert(src: str | Path, out: str | Path, max_shard_size: str | int = "5GB", overwrite: bool = False) -> Path:
    """Write the Hugging Face directory `out` from the expert at `src`; atomic (temporary directory, renamed)."""
    expert = resolve_expert(src)
    cap = parse_shard_size(max_shard_size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; move it away or choose another output directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")
    manifest = read_manifest(expert)
    specs = {name: (getattr(torch, e["dtype"]), tuple(e["shape"])) for name, e in manifest["tensors"].items()}
    split = split_state_dict_into_shards_factory(
        specs,
        get_storage_size=lambda spec: nbytes(*spec),
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=cap,
    )
    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    with write_errors(tmp):
        tmp.mkdir(parents=True)
    try:
        verify_files(expert, manifest)  # sha256 of every file before anything is read
        bar = tqdm(total=len(specs), desc="export", unit="tensor")
        for filename, names in split.filename_to_tensors.items():  # the planner's order, not the manifest's
            with write_errors(tmp / filename):
                shard = SafetensorsStream(
                    tmp / filename, [(n, *specs[n]) for n in names], metadata={"format": "pt"}, digest=False
                )
                for name, tensor in assemble(expert, manifest, check=True, names=names):  # every pruned row's zeros
                    shard.write(name, tensor)
                    del tensor
                    bar.update(1)
                shard.close()
        bar.close()
        if len(split.filename_to_tensors) > 1:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            with write_errors(tmp / INDEX):
                (tmp / INDEX).write_text(json.dumps(index, indent=2))
        for side in _side_files(expert, manifest):
            with write_errors(tmp / side.name):
                shutil.copy2(side, tmp / side.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish(tmp, out)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    text = (
        "stream a sparse expert into a Hugging Face directory (safetensors shards + index, config, tokenizer) that "
        "AutoModelForCausalLM.from_pretrained loads; checks every file's sha256 and every pruned row's zeros. One "
        "process, no launcher; host memory about twice the largest tensor"
    )
    p = sub.add_parser("export", help=text, description=text)
    p.add_argument(
        "--ckpt",
        required=True,
        metavar="DIR",
        help="the expert directory a run writes (output_dir/expert), or the run's output_dir",
    )
    p.add_argument("--out", required=True, metavar="HF_DIR", help="the Hugging Face directory to write")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB); one model.safetensors when it fits",
    )
    p.add_argument("--overwrite", action="store_true", help="replace HF_DIR if it exists and is not empty")


def export_command(args: argparse.Namespace) -> int:
    out = export_expert(args.ckpt, args.out, args.max_shard_size, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
