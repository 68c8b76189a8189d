"""ZeRO-3 partition geometry (exert_ds/runtime/shard.py), checked against brute force and DeepSpeed itself."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from exert_ds.runtime.shard import (
    ShardRange,
    all_shard_ranges,
    boundary_rows,
    from_row_block,
    owned_rows,
    row_block,
    shard_range,
    valid_mask_of_block,
)

REPO = Path(__file__).resolve().parents[1]

ODD_SHAPES = [(7, 5), (1, 13), (13, 1), (3, 4), (1, 1), (2, 3), (13,), (2, 3, 4)]
WORLDS = list(range(1, 9))

_H, _HEADS, _KV, _HD, _FF, _VOCAB = 8192, 64, 8, 128, 28672, 128256
LLAMA3_70B = {
    "q": (_HEADS * _HD, _H),
    "k": (_KV * _HD, _H),
    "v": (_KV * _HD, _H),
    "o": (_H, _HEADS * _HD),
    "gate": (_FF, _H),
    "up": (_FF, _H),
    "down": (_H, _FF),
    "embed": (_VOCAB, _H),
}
BIG_WORLDS = [1, 2, 3, 8, 16, 32, 64]


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    numel = math.prod(shape)
    in_f = shape[-1] if len(shape) >= 2 else numel
    return numel // in_f, in_f


def _fake_ds_tensor(flat: torch.Tensor, rng: ShardRange) -> torch.Tensor:
    """What ds_tensor looks like on `rng.rank`: P elements, tail padding filled with garbage (NaN)."""
    buf = torch.full((rng.partition_size,), float("nan"), dtype=flat.dtype)
    buf[: rng.valid] = flat[rng.start : rng.end]
    return buf


def _deepspeed_partition_size(numel: int, world: int) -> int:
    """DeepSpeed 0.19.8's own arithmetic, run through its real methods with a stand-in `self`.

    runtime/zero/partition_parameters.py: Init._aligned_size (line 1690) = ds_numel + Init._padding_size
    (line 1693: pad to a multiple of the partition world size), and Init._partition_param
    (lines 1816-1817): `partition_size = self._aligned_size(param) // self._partition_world_size(param)`.
    """
    from deepspeed.runtime.zero.partition_parameters import Init

    stub = SimpleNamespace(_partition_world_size=lambda _p: world)
    stub._padding_size = lambda p: Init._padding_size(stub, p)
    aligned = Init._aligned_size(stub, SimpleNamespace(ds_numel=numel))
    assert aligned % world == 0
    # Same quantity as the all-gather buffer size in _all_gather_sequential (line 1376): ceil(numel/world)*world.
    assert aligned == math.ceil(numel / world) * world
    return aligned // world


def _check_tiling(ranges: list[ShardRange], numel: int, world: int) -> None:
    assert [r.rank for r in ranges] == list(range(world))
    p = -(-numel // world)
    pos = 0
    for r in ranges:
        assert r.partition_size == p
        assert r.start == pos and r.end >= r.start
        assert r.start == min(r.rank * p, numel) and r.end == min((r.rank + 1) * p, numel)
        assert r.valid == r.end - r.start <= p
        pos = r.end
    assert pos == numel


# ---------------------------------------------------------------------------------------------- odd shapes


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_odd_shapes_geometry(shape: tuple[int, ...], world: int) -> None:
    numel = math.prod(shape)
    out_f, in_f = _rows_cols(shape)
    ranges = all_shard_ranges(shape, world)
    _check_tiling(ranges, numel, world)

    full = torch.arange(1, numel + 1, dtype=torch.float64)
    recon = torch.zeros(out_f, in_f, dtype=torch.float64)
    touched_by: dict[int, int] = {}
    owners: list[int] = []
    for rng in ranges:
        assert rng.in_features == in_f
        assert rng.row_start * in_f <= rng.start and rng.end <= rng.row_end * in_f
        assert rng.num_rows == len(range(rng.row_start, rng.row_end))
        assert 0 <= rng.head_offset < in_f or rng.valid == 0
        if rng.valid:
            assert rng.num_rows == math.ceil(rng.end / in_f) - rng.start // in_f
        else:
            assert rng.num_rows == 0 and owned_rows(rng) == range(0) and boundary_rows(rng) == []

        ds = _fake_ds_tensor(full, rng)
        block = row_block(ds, rng)
        assert block.shape == (rng.num_rows, in_f) and block.dtype == full.dtype
        assert not block.isnan().any(), "padding leaked into the row block"
        mask = valid_mask_of_block(rng)
        assert mask.shape == block.shape and int(mask.sum()) == rng.valid
        assert torch.equal(block[~mask], torch.zeros_like(block[~mask]))
        assert torch.equal(from_row_block(block, rng), full[rng.start : rng.end])
        assert torch.equal(row_block(from_row_block(block, rng), rng), block)  # valid-length input works too
        recon[rng.row_start : rng.row_end] += block

        for row in range(rng.row_start, rng.row_end):
            touched_by[row] = touched_by.get(row, 0) + 1
        owners.extend(owned_rows(rng))
        for row in owned_rows(rng):
            assert row_owner(row, shape, world) == rng.rank

        b = boundary_rows(rng)
        assert len(b) <= 2 and len(set(b)) == len(b)
        assert all(rng.row_start <= row < rng.row_end for row in b)
        assert rng.first_row_partial == (rng.row_start in b) or rng.valid == 0
        assert rng.last_row_partial == (rng.row_end - 1 in b) or rng.valid == 0

    assert torch.equal(recon.reshape(-1), full)
    assert owners == list(range(out_f)), "owned_rows over all ranks must partition range(out)"
    assert sorted(touched_by) == list(range(out_f))
    # A row is a boundary row of a rank exactly when several ranks share it.
    for rng in ranges:
        for row in range(rng.row_start, rng.row_end):
            assert (row in boundary_rows(rng)) == (touched_by[row] > 1)
    for row in range(out_f):
        owner = row_owner(row, shape, world)
        assert ranges[owner].start <= row * in_f < ranges[owner].end


def row_owner(row: int, shape: tuple[int, ...], world: int) -> int:
    """Oracle: the rank whose flat range [r·P, (r+1)·P) holds the row's first element, P = ceil(numel / world)."""
    numel, width = math.prod(shape), shape[-1]
    assert 0 <= row < numel // width
    return row * width // -(-numel // world)


def test_hand_computed_7x5_world3() -> None:
    r0, r1, r2 = all_shard_ranges((7, 5), 3)  # numel 35, P = 12
    assert (r0.start, r0.end, r1.start, r1.end, r2.start, r2.end) == (0, 12, 12, 24, 24, 35)
    assert (r0.row_start, r0.row_end, r0.head_offset) == (0, 3, 0)
    assert (r1.row_start, r1.row_end, r1.head_offset) == (2, 5, 2)
    assert (r2.row_start, r2.row_end, r2.head_offset) == (4, 7, 4)
    assert [owned_rows(r) for r in (r0, r1, r2)] == [range(0, 3), range(3, 5), range(5, 7)]
    assert [boundary_rows(r) for r in (r0, r1, r2)] == [[2], [2, 4], [4]]
    assert (r0.first_row_partial, r0.last_row_partial) == (False, True)
    assert (r2.first_row_partial, r2.last_row_partial) == (True, False)
    assert [row_owner(i, (7, 5), 3) for i in range(7)] == [0, 0, 0, 1, 1, 2, 2]


def test_rank_with_nothing() -> None:
    rng = shard_range(12, (3, 4), 5, 4)  # P = 3, ranks 0..3 cover all 12 elements
    assert (rng.partition_size, rng.start, rng.end, rng.valid, rng.num_rows) == (3, 12, 12, 0, 0)
    assert not rng.first_row_partial and not rng.last_row_partial
    assert row_block(torch.full((3,), float("nan")), rng).shape == (0, 4)
    assert from_row_block(torch.zeros(0, 4), rng).numel() == 0
    assert valid_mask_of_block(rng).shape == (0, 4)


def test_one_row_inside_a_rank_is_partial_at_both_ends() -> None:
    rng = shard_range(13, (1, 13), 3, 1)  # P = 5: elements 5..9 of the only row
    assert (rng.row_start, rng.row_end, rng.head_offset) == (0, 1, 5)
    assert rng.first_row_partial and rng.last_row_partial and boundary_rows(rng) == [0]
    assert owned_rows(rng) == range(0) and row_owner(0, (1, 13), 3) == 0


def test_row_block_keeps_dtype_device_and_grad() -> None:
    rng = shard_range(35, (7, 5), 4, 1)  # P = 9
    x = torch.randn(rng.partition_size, dtype=torch.float32, requires_grad=True)
    block = row_block(x, rng)
    block.sum().backward()
    assert torch.equal(x.grad, (torch.arange(rng.partition_size) < rng.valid).float())
    for dtype in (torch.bfloat16, torch.bool, torch.int64):
        b = row_block(torch.ones(rng.partition_size, dtype=dtype), rng)
        assert b.dtype == dtype and torch.equal(b.bool(), valid_mask_of_block(rng))


def test_shard_range_is_frozen() -> None:
    rng = shard_range(35, (7, 5), 2, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rng.start = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------------- LLaMA-3-70B on meta


@pytest.mark.parametrize("world", BIG_WORLDS)
@pytest.mark.parametrize("role", list(LLAMA3_70B))
def test_llama3_70b_shapes(role: str, world: int) -> None:
    w = torch.empty(LLAMA3_70B[role], device="meta", dtype=torch.bfloat16)
    shape, numel = tuple(w.shape), w.numel()
    out_f, in_f = shape
    ranges = all_shard_ranges(shape, world)
    _check_tiling(ranges, numel, world)
    p = _deepspeed_partition_size(numel, world)
    total_rows = 0
    for rng in ranges:
        assert rng.partition_size == p == math.ceil(numel / world)
        assert len(boundary_rows(rng)) <= 2
        total_rows += rng.num_rows
        ds = torch.empty(rng.partition_size, device="meta", dtype=w.dtype)
        block = row_block(ds, rng)
        assert block.shape == (rng.num_rows, in_f) and block.is_meta and block.dtype == w.dtype
        assert from_row_block(block, rng).shape == (rng.valid,)
    assert total_rows <= out_f + world - 1  # each cut shares at most one row
    owners = [row for rng in ranges for row in owned_rows(rng)]
    assert owners == list(range(out_f))
    for row in (0, out_f // 3, out_f - 1):
        assert row in owned_rows(ranges[row_owner(row, shape, world)])


@pytest.mark.parametrize("numel", [1, 2, 7, 12, 35, 1024 * 8192, 128256 * 8192, 2**31 + 3])
@pytest.mark.parametrize("world", [1, 2, 3, 5, 7, 8, 64, 1000])
def test_partition_size_matches_deepspeed(numel: int, world: int) -> None:
    assert shard_range(numel, (numel,), world, 0).partition_size == _deepspeed_partition_size(numel, world)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("numel", "shape", "world", "rank"),
    [
        (35, (7, 5), 0, 0),
        (35, (7, 5), -1, 0),
        (35, (7, 5), 4, 4),
        (35, (7, 5), 4, -1),
        (36, (7, 5), 4, 0),
        (35, (5, 7, 1, 2), 4, 0),
        (0, (0, 5), 2, 0),
        (0, (), 1, 0),
        (6, (-2, -3), 1, 0),
    ],
)
def test_bad_input_raises(numel: int, shape: tuple[int, ...], world: int, rank: int) -> None:
    with pytest.raises(ValueError):
        shard_range(numel, shape, world, rank)


def test_bad_helper_input_raises() -> None:
    rng = shard_range(35, (7, 5), 3, 1)
    with pytest.raises(ValueError):
        row_block(torch.zeros(rng.valid - 1), rng)
    with pytest.raises(ValueError):
        from_row_block(torch.zeros(rng.num_rows + 1, 5), rng)
    with pytest.raises(ValueError):
        all_shard_ranges((7, 5), 0)


# ------------------------------------------------------------------------- against a real ZeRO-3 partition

_DS_WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.multiprocessing as mp

    def worker(rank, world, port, out_dir):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        import deepspeed
        from exert_ds.runtime.shard import from_row_block, row_block, shard_range, valid_mask_of_block
        deepspeed.init_distributed(dist_backend="gloo")
        cfg = {"train_batch_size": world, "zero_optimization": {"stage": 3}}
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            m = torch.nn.ModuleList([torch.nn.Linear(5, 7), torch.nn.Linear(13, 1), torch.nn.Linear(1, 13),
                                     torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(64, 48)])
        for p in m.parameters():
            rng = shard_range(p.ds_numel, tuple(p.ds_shape), world, rank)
            assert p.ds_tensor.numel() == rng.partition_size, (p.ds_tensor.numel(), rng)
            block = row_block(p.ds_tensor, rng)
            with deepspeed.zero.GatheredParameters([p]):
                full = p.data.detach().clone()
            rows = full.reshape(-1, rng.in_features)[rng.row_start:rng.row_end]
            assert torch.equal(from_row_block(block, rng), full.reshape(-1)[rng.start:rng.end]), rng
            assert torch.equal(block, torch.where(valid_mask_of_block(rng), rows, 0)), rng
        with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
            f.write(str(sum(1 for _ in m.parameters())))
        # leave together: a rank that exits while gloo still serves a peer aborts ("terminate called ...")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]), nprocs=int(sys.argv[1]))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_matches_real_zero3_partition(tmp_path: Path) -> None:
    """Spawn a 5-rank CPU/gloo ZeRO-3 Init and compare every ds_tensor with shard_range (ranks with 0 elements too)."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "ds_worker.py"
    script.write_text(_DS_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    world = 5
    proc = subprocess.run(
        [sys.executable, str(script), str(world), str(_free_port()), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for r in range(world):  # each rank leaves a file after checking all 9 parameters
        assert (tmp_path / f"ok{r}").read_text() == "9", f"rank {r} did not finish"
