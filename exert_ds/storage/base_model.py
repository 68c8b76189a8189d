"""Fingerprint of the base model's files, so that a checkpoint is resumed only onto the weights it was written from.

A training checkpoint stores the pruned projections and the LoRA state; every other base weight (embeddings,
norms, `lm_head`) is read again from `model.name_or_path` on resume. If those files changed (another model with
the same config), the resumed model would mix the two silently, so a checkpoint (and an expert, as provenance)
records this fingerprint and a resume compares it.

What it reads, per file of the model (`config.json` and the weight files: *.safetensors, *.bin, *.pt, *.pth,
*.gguf and the shard indexes):
- its size;
- a file of at most `FULL_HASH_LIMIT` (64 MiB): the sha256 of the whole file;
- a larger one: the sha256 of its first 1 MiB (a safetensors or GGUF header: every tensor's name, dtype, shape and
  offset), its last 1 MiB and `SAMPLES` (64) blocks of 64 KiB spread evenly between.
Cost: at most 6 MiB read per large file, so about 180 MiB for a 70B bf16 model in 30 shards of 5 GB (a second or
two from local NVMe, where a full sha256 of 140 GB would take minutes); tiny models are hashed whole. What it can
miss: a file whose size, header and sampled blocks are unchanged but whose other bytes differ (a model that
changed only tensors smaller than the gap between samples, about 75 MB in a 5 GB shard, in every one of them).

With `model.init: random` the weights come from `config.json` and the run's seed (in the config fingerprint):
only `config.json` is fingerprinted. A hub name is read from the local Hugging Face cache; `None` when it is not
there yet (the first run downloads it: the trainer fingerprints again after loading).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from exert_ds.config import ModelConfig

FULL_HASH_LIMIT = 64 << 20
EDGE = 1 << 20
SAMPLES = 64
BLOCK = 64 << 10
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")


def file_fingerprint(path: Path) -> dict[str, int | str]:
    """{"size": bytes, "sha256": hex}: of the whole file up to FULL_HASH_LIMIT, else of the sampled blocks."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
            return {"size": size, "sha256": digest.hexdigest()}
        gap = (size - 2 * EDGE - BLOCK) / (SAMPLES - 1)
        spans = [(0, EDGE), *((EDGE + round(i * gap), BLOCK) for i in range(SAMPLES)), (size - EDGE, EDGE)]
        for offset, length in spans:
            fh.seek(offset)
            digest.update(fh.read(length))
    return {"size": size, "sha256": digest.hexdigest(), "sampled": f"{SAMPLES} blocks of {BLOCK} B + head/tail"}


def _model_dir(cfg: ModelConfig) -> tuple[Path, list[str]] | None:
    """(folder, file names to fingerprint) or None for a hub model not in the local cache."""
    if cfg.name_or_path.endswith(".gguf"):
        path = Path(cfg.name_or_path)
        return path.parent, [path.name]
    folder = Path(cfg.name_or_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(cfg.name_or_path, revision=cfg.revision, local_files_only=True))
        except Exception:  # not cached (or not a hub name: the model load says so in its own words)
            return None
    if cfg.gguf_file:
        return folder, [cfg.gguf_file]
    names = ["config.json"]
    if cfg.init != "random":
        names += sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return folder, names


def base_model_fingerprint(cfg: ModelConfig) -> dict | None:
    """{"path": model.name_or_path, "files": {name: file_fingerprint}} of the model's files; None when the model
    is a hub name not downloaded yet."""
    found = _model_dir(cfg)
    if found is None:
        return None
    folder, names = found
    files = {name: file_fingerprint(folder / name) for name in names if (folder / name).is_file()}
    return {"path": cfg.name_or_path, "files": files}


def base_model_difference(saved: dict | None, now: dict | None) -> str | None:
    """None when the two fingerprints agree (or either is unknown), else which file differs and how."""
    if not saved or not now:
        return None
    old, new = saved["files"], now["files"]
    for name in sorted(set(old) | set(new)):
        if name not in new:
            return f"{name} is gone"
        if name not in old:
            return f"{name} is new"
        if old[name] != new[name]:
            what = "size" if old[name]["size"] != new[name]["size"] else "sha256"
            return f"{name} has another {what}"
    return None
