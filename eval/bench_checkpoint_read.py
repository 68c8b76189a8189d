"""Resume read speed of one checkpoint rank file on the CPU, before and after issue 18.3, in one process.

A synthetic rank file (ELEMENTS float32 base weights at 50% sparsity, stored sparse, plus their float32 EMA scores,
stored sparse as format 4 does) is read, with the page cache dropped before each read (posix_fadvise DONTNEED):
- before: the previous resume path: sha256 of the whole file, then torch.load (no mmap), then every entry decoded
  one after the other;
- after: `checkpoint._read_rank_files`: the file memory-mapped and hashed on a thread while torch.load(mmap=True)
  reads the same pages and `checkpoint_schema.assemble` decodes the entries on DECODE_THREADS threads.
Alternated REPEATS times; GB/s = file bytes over seconds. Writes JSON to --out.

    DS_ACCELERATOR=cpu python3 eval/bench_checkpoint_read.py --out eval/results/checkpoint_read_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from exert_ds.storage import checkpoint as ckpt  # noqa: E402
from exert_ds.storage.checkpoint_fields import FIELDS, pack_sparse, unpack_sparse  # noqa: E402
from exert_ds.storage.checkpoint_schema import (  # noqa: E402
    DECODE_THREADS,
    EMA,
    ENGINE_SCALARS,
    FIELD_TABLE,
    FILES,
    FORMAT,
    PARAMS,
    RNG,
    WEIGHTS,
    RankField,
)
from exert_ds.storage.manifest import CHECKPOINT_FORMAT_VERSION as FORMAT_VERSION  # noqa: E402
from exert_ds.storage.manifest import checkpoint_rank_file as rank_file  # noqa: E402
from exert_ds.storage.manifest import sha256_file  # noqa: E402


def drop(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--elements", type=int, default=64 << 20, help="base weight elements in the file")
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    generator = torch.Generator().manual_seed(0)
    size = args.elements // args.tensors
    names = [f"w{i}" for i in range(args.tensors)]
    weights, emas = {}, {}
    for name in names:
        w = torch.randn(size, generator=generator)
        w[torch.rand(size, generator=generator) < 0.5] = 0
        weights[name], emas[name] = pack_sparse(w), pack_sparse(w.abs() + 1e-3)
    folder = Path(tempfile.mkdtemp(prefix="exert_read_"))
    file = folder / rank_file(0)
    torch.save({WEIGHTS: weights, EMA: emas, RNG: {}, ENGINE_SCALARS: {}}, file)
    del weights, emas
    ranges = {"shape": [size], "ranges": [[0, size]]}
    manifest = {
        FORMAT: FORMAT_VERSION,
        FILES: {file.name: sha256_file(file)},
        PARAMS: {n: ranges for n in names},
        FIELD_TABLE: {WEIGHTS: PARAMS, EMA: PARAMS},
    }
    table = {f.key: f for f in FIELDS}
    fields = tuple(
        RankField(key, PARAMS, lambda _: {n: n for n in names}, None, None, decode=table[key].decode)
        for key in (WEIGHTS, EMA)
    )

    def before() -> None:
        assert sha256_file(file) == manifest[FILES][file.name]
        data = torch.load(file, weights_only=False)
        for key in (WEIGHTS, EMA):
            for entry in data[key].values():
                unpack_sparse(entry)

    def after() -> None:
        loaded, _, problem = ckpt._read_rank_files(folder, manifest, [0], fields, None)
        assert problem is None and len(loaded[WEIGHTS]) == len(names)

    timings: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.repeats):
        for name, read in (("before", before), ("after", after)):
            drop(file)
            start = time.perf_counter()
            read()
            timings[name].append(time.perf_counter() - start)
    nbytes = file.stat().st_size
    results = {
        "benchmark": "eval/bench_checkpoint_read.py",
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "decode_threads": DECODE_THREADS,
        "file_bytes": nbytes,
        "seconds": timings,
        "GBps_best": {k: nbytes / min(v) / 1e9 for k, v in timings.items()},
        "GBps_median": {k: nbytes / sorted(v)[len(v) // 2] / 1e9 for k, v in timings.items()},
    }
    file.unlink()
    folder.rmdir()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
