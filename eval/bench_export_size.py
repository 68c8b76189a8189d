"""Size on disk of one expert exported as dense safetensors and as compressed-tensors (issue 17 point 1), with the
seconds each export takes. One process; runs on CPU (a CUDA device, when there is one, only speeds up building a
random expert).

Either an existing expert (`--expert DIR`, e.g. the quickstart's `runs/quickstart/expert`), or one built here from
a config (`--config-dir eval/configs/llama2_7b_shape`): random bf16 weights, every row of the seven projections
pruned by magnitude to `--sparsity` (or to N:M with `--n-m 2:4`), written by `write_expert` as one rank.

    python3 eval/bench_export_size.py --expert runs/quickstart/expert --out eval/results/export_size_quickstart.json
    python3 eval/bench_export_size.py --config-dir eval/configs/llama2_7b_shape --n-m 2:4 --work-dir /tmp/es \\
        --out eval/results/export_size_7b_24.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from exert_ds.storage.expert import pruned_roles, write_expert  # noqa: E402
from exert_ds.storage.export import export_expert  # noqa: E402


def folder_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


class _NoTokenizer:
    """A config-only model has no tokenizer; the expert writer only calls save_pretrained on it."""

    def save_pretrained(self, out: Path) -> None:
        pass


def parse_n_m(text: str | None) -> tuple[int, int]:
    """'2:4' → (2 zeros, 4 per group); None → unstructured (0, 0)."""
    if not text:
        return 0, 0
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError as err:
        raise SystemExit(f"--n-m {text!r}: give ZEROS:GROUP, e.g. 2:4") from err
    return n, m


@torch.no_grad()
def build_expert(config_dir: str, out: Path, sparsity: float, n: int, m: int, seed: int) -> Path:
    """A random bf16 model of `config_dir`'s shape, its projections pruned by magnitude (per row, or the n smallest
    of every group of m), written as a 1-rank expert."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(config_dir)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    roles = pruned_roles(model)
    for param in model.parameters():
        if id(param) in roles:
            rows, cols = param.shape
            groups = param.view(rows, -1, m) if m else param.view(rows, 1, cols)
            k = n if m else int(sparsity * cols)
            for first in range(0, rows, 1024):  # row blocks: the sort's indices stay small
                block = groups[first : first + 1024]
                block.scatter_(2, block.abs().float().argsort(dim=2)[..., :k], 0)
    return write_expert(model, _NoTokenizer(), out, sparsity=sparsity if not m else n / m, n=n, m=m)


def timed_export(expert: Path, out: Path, fmt: str, max_shard_size: str) -> dict:
    start = time.perf_counter()
    export_expert(expert, out, max_shard_size, overwrite=True, fmt=fmt)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "safetensors_bytes": folder_bytes(out, "*.safetensors"),
        "folder_bytes": folder_bytes(out),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--expert", help="an expert directory (output_dir/expert)")
    source.add_argument("--config-dir", help="build a random pruned bf16 expert of this config.json's shape")
    parser.add_argument("--sparsity", type=float, default=0.5, help="with --config-dir: zeros per row (default 0.5)")
    parser.add_argument("--n-m", default=None, metavar="N:M", help="with --config-dir: N zeros in every M, e.g. 2:4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="/tmp/exert_bench_export_size", help="where the exports go (emptied)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--out", required=True, help="results JSON")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.expert:
        expert = Path(args.expert)
    else:
        n, m = parse_n_m(args.n_m)
        expert = build_expert(args.config_dir, work / "expert", args.sparsity, n, m, args.seed)
    manifest = json.loads((expert / "expert_manifest.json").read_text())
    dense = timed_export(expert, work / "dense", "dense", args.max_shard_size)
    compressed = timed_export(expert, work / "compressed", "compressed-tensors", args.max_shard_size)
    sparsity_config = json.loads((work / "compressed" / "config.json").read_text())["quantization_config"]
    import compressed_tensors

    results = {
        "benchmark": "eval/bench_export_size.py",
        "command": shlex.join(["python3", "eval/bench_export_size.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "versions": {"torch": torch.__version__, "compressed_tensors": compressed_tensors.__version__},
        "expert": str(expert),
        "promise": manifest["promise"],
        "dtypes": sorted({e["dtype"] for e in manifest["tensors"].values()}),
        "expert_bytes": folder_bytes(expert, "expert-rank*.safetensors"),
        "dense": dense,
        "compressed_tensors": compressed | {"sparsity_config": sparsity_config["sparsity_config"]},
        "compressed_over_dense": compressed["safetensors_bytes"] / dense["safetensors_bytes"],
        "expert_over_dense": folder_bytes(expert, "expert-rank*.safetensors") / dense["safetensors_bytes"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(
        f"dense {dense['safetensors_bytes'] / 1e9:.3f} GB, compressed-tensors "
        f"{compressed['safetensors_bytes'] / 1e9:.3f} GB ({results['compressed_over_dense']:.3f}x), exert-ds expert "
        f"{results['expert_bytes'] / 1e9:.3f} GB ({results['expert_over_dense']:.3f}x); wrote {args.out}"
    )
    return results


if __name__ == "__main__":
    main()
