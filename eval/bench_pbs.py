"""Benchmark: vectorised ForeSight scoring and Partial Brain Surgeon (PBS) vs a per-row Python loop.

Why: algorithm.md §4 requires PBS to be batched over rows ("never a Python loop over rows"), and scoring +
PBS is the compute of a prune event. This script measures what the batching buys on LLaMA-2-7B /
LLaMA-3-8B shaped matrices (LoRA r=16, float32, 50% per-row sparsity) on the current device (CUDA if
available, else CPU), and checks that the vectorised results equal a literal per-row implementation of
the same formulas (algorithm.md §1, §3, §4) on the rows the loop covers.

Method: vectorised ops run over whole matrices; per-row loops run on the first N rows of each matrix only
and are extrapolated linearly to all rows (the output says so). Each timing: one warm-up, then the median
of --repeats runs, with torch.cuda.synchronize() around the timed region. Not timed: collecting H = XᵀX
and E (a prune event gets them from its calibration forward) and forming U = W + s·B·A.

Usage: python eval/bench_pbs.py --out eval/results/pbs_speed [--rows-for-loop 64] [--repeats 5] [--small]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from exert_ds.prune.foresight import (  # noqa: E402
    ROLES,
    Companion,
    HeadGeometry,
    companion_factors,
    companion_sumsq,
    foresight_scores,
    role_scores,
    row_mask,
)
from exert_ds.prune.pbs import (  # noqa: E402
    float32_matmul_precision,
    partial_brain_surgeon,
    partial_brain_surgeon_reference,
)

T = TypeVar("T")
MAX_REL_ERR = 1e-3
MAX_MASK_MISMATCH = 1e-4  # fraction of entries; only float near-ties between two summation orders may flip
SPARSITY = 0.5
RANK = 16
SCALE = 2.0  # lora_alpha / r = 32 / 16
PBS_REG = 1e-2
REF_REG = 1e-8
DTYPE = torch.float32
SCORES_BLOCK_OP = "foresight_scores + row_mask 50% (7 matrices)"
TF32 = " (TF32 products)"  # op-name suffix of the runs under pbs.matmul_precision "high" (CUDA only)


@dataclass(frozen=True)
class BlockShape:
    """One decoder block's geometry."""

    name: str
    hidden: int
    ffn: int
    num_heads: int
    num_kv_heads: int

    @property
    def kv_rows(self) -> int:
        return self.hidden // self.num_heads * self.num_kv_heads

    def matrix_shape(self, role: str) -> tuple[int, int]:
        """(out, in) of one role."""
        return {
            "q": (self.hidden, self.hidden),
            "k": (self.kv_rows, self.hidden),
            "v": (self.kv_rows, self.hidden),
            "o": (self.hidden, self.hidden),
            "gate": (self.ffn, self.hidden),
            "up": (self.ffn, self.hidden),
            "down": (self.hidden, self.ffn),
        }[role]


FULL_BLOCKS = (BlockShape("LLaMA-2-7B", 4096, 11008, 32, 32), BlockShape("LLaMA-3-8B", 4096, 14336, 32, 8))
SMALL_BLOCKS = (BlockShape("LLaMA-2-7B (small)", 128, 344, 4, 4), BlockShape("LLaMA-3-8B (small)", 128, 448, 4, 2))
H_GROUP = {
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "o": "o_in",
    "gate": "mlp_in",
    "up": "mlp_in",
    "down": "down_in",
}


# ----------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn: Callable[[], T], device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, list[float], T]:
    """Median wall-clock ms of `fn` over `repeats` runs after `warmup` runs; also all times and the last output."""
    out = fn()
    for _ in range(warmup - 1):
        out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times, out


def rel_err(got: Tensor, want: Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------ random inputs


def random_layer(out_f: int, in_f: int, device: torch.device) -> dict[str, Tensor]:
    """W, LoRA A (PEFT Kaiming-uniform bound 1/√in) and a trained-looking non-zero B, float32."""
    bound = 1.0 / in_f**0.5
    return {
        "W": torch.randn(out_f, in_f, device=device, dtype=DTYPE) * 0.02,
        "A": (torch.rand(RANK, in_f, device=device, dtype=DTYPE) * 2 - 1) * bound,
        "B": torch.randn(out_f, RANK, device=device, dtype=DTYPE) * 0.01,
    }


def random_hessian(in_f: int, tokens: int, device: torch.device) -> Tensor:
    """H = XᵀX from `tokens` random activations with uneven (log-normal) channel scales."""
    x = (
        torch.randn(tokens, in_f, device=device, dtype=DTYPE)
        * torch.randn(in_f, device=device, dtype=DTYPE).mul(0.5).exp()
    )
    return x.T @ x


def effective(layer: dict[str, Tensor]) -> Tensor:
    return layer["W"] + SCALE * (layer["B"] @ layer["A"])


# -------------------------------------------------------------------------------- per-row loops (literal)


def pbs_hessian_loop(layer: dict[str, Tensor], keep: Tensor, hessian: Tensor, rows: int) -> Tensor:
    """ΔB of the first `rows` rows, one row at a time, exactly algorithm.md §4 (mode hessian)."""
    W, A, B = layer["W"], layer["A"], layer["B"]
    eye = torch.eye(A.shape[0], dtype=W.dtype, device=W.device)
    delta = torch.empty(rows, A.shape[0], dtype=W.dtype, device=W.device)
    for i in range(rows):
        m = keep[i].to(W.dtype)
        p = (W[i] + SCALE * (B[i] @ A)) * (1 - m)  # p_i = (1 − M_i) ⊙ U_i
        a_hat = A * m  # Â_i
        gram = a_hat @ hessian @ a_hat.T  # G_i = Â_i H Â_iᵀ
        rhs = (p @ hessian) @ a_hat.T  # p_i H Â_iᵀ
        damp = PBS_REG * gram.diagonal().mean()
        damp = torch.where(damp > 0, damp, torch.ones_like(damp))
        delta[i] = torch.linalg.solve(gram + damp * eye, rhs) / SCALE
    return delta


def pbs_reference_loop(layer: dict[str, Tensor], keep: Tensor, energy: Tensor, rows: int) -> Tensor:
    """ΔB of the first `rows` rows, one row at a time (mode reference, κ = 1), as the authors' code loops.

    With κ = 1 the r×r system κ A D Aᵀ + λI is the same for every row; it is built once, outside the loop
    (this favours the loop).
    """
    W, A, B = layer["W"], layer["A"], layer["B"]
    eye = torch.eye(A.shape[0], dtype=W.dtype, device=W.device)
    system = (A * energy) @ A.T + REF_REG * eye
    delta = torch.empty(rows, A.shape[0], dtype=W.dtype, device=W.device)
    for i in range(rows):
        pruned = (~keep[i]).to(W.dtype)
        rhs = ((W[i] + SCALE * (B[i] @ A)) * pruned * energy) @ A.T
        delta[i] = -torch.linalg.solve(system, rhs) / SCALE
    return delta


def companion_tables(U: dict[str, Tensor], num_heads: int, num_kv_heads: int) -> dict[str, Tensor]:
    """The block's companion norms (algorithm.md §1), written independently of exert_ds, whole-matrix."""
    d = U["q"].shape[0] // num_heads
    g = num_heads // num_kv_heads
    q_head_sq = U["q"].view(num_heads, d, -1).square().sum(1)  # (H, in)
    o_col_sq = U["o"].square().sum(0)  # (H·d,)
    return {
        "k_head_norm": U["k"].view(num_kv_heads, d, -1).square().sum(1).sqrt(),  # (Hkv, in)
        "q_group_rms": q_head_sq.view(num_kv_heads, g, -1).mean(1).sqrt(),  # (Hkv, in)
        "o_group_rms": o_col_sq.view(num_kv_heads, g, d).mean(1).sqrt().reshape(-1),  # (Hkv·d,)
        "mlp_read": (U["gate"].square().sum(0).sqrt() + U["up"].square().sum(0).sqrt()) / 2,  # (hidden,)
        "down_write": U["down"].square().sum(1).sqrt(),  # (hidden,)
    }


def row_factor(role: str, i: int, tables: dict[str, Tensor], head_dim: int, group: int) -> Tensor | float:
    """F_role for row i: a per-column vector or a scalar (algorithm.md §1 table)."""
    if role == "q":
        return tables["k_head_norm"][(i // head_dim) // group]
    if role == "k":
        return tables["q_group_rms"][i // head_dim]
    if role == "v":
        return tables["o_group_rms"][i]
    if role == "o":
        return tables["mlp_read"][i]
    if role in ("gate", "up"):
        return tables["down_write"]
    return 1.0


def score_mask_loop(
    role: str, U: Tensor, energy: Tensor, tables: dict[str, Tensor], head_dim: int, group: int, rows: int
) -> tuple[Tensor, Tensor]:
    """Scores and keep-mask of the first `rows` rows, one row at a time: score, stable sort, prune lowest."""
    cols = U.shape[1]
    k = int(SPARSITY * cols)
    x_hat = energy.clamp_min(0).sqrt()
    scores = torch.empty(rows, cols, dtype=U.dtype, device=U.device)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=U.device)
    for i in range(rows):
        s = U[i].abs() * x_hat * row_factor(role, i, tables, head_dim, group)
        keep[i, torch.argsort(s, stable=True)[:k]] = False
        scores[i] = s
    return scores, keep


# -------------------------------------------------------------------------------------------- benchmarks


def loop_entry(loop_ms: float, loop_all: list[float], n: int, total_rows: int) -> dict[str, Any]:
    return {
        "loop_rows": n,
        "total_rows": total_rows,
        "loop_ms_on_rows": loop_ms,
        "loop_ms_on_rows_all": loop_all,
        "loop_ms_extrapolated": loop_ms * total_rows / n,
    }


def check(name: str, err: float) -> None:
    if not err < MAX_REL_ERR:
        sys.exit(f"FAIL: {name}: vectorised vs per-row loop relative error {err:.3e} >= {MAX_REL_ERR:g}")


def bench_pbs_shape(out_f: int, in_f: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Section 1 for one shape: partial_brain_surgeon (hessian) and _reference (κ=1) vs per-row loops."""
    layer = random_layer(out_f, in_f, device)
    W, A, B = layer["W"], layer["A"], layer["B"]
    hessian = random_hessian(in_f, args.tokens, device)
    energy = hessian.diagonal().clone()
    keep = row_mask(effective(layer).abs() * energy.sqrt(), SPARSITY)
    n = min(args.rows_for_loop, out_f)

    def hessian_mode(precision: str) -> Tensor:
        with float32_matmul_precision(precision):
            return partial_brain_surgeon(W, A, B, SCALE, keep, hessian, reg=PBS_REG)

    hessian_loop = time_ms(lambda: pbs_hessian_loop(layer, keep, hessian, n), device, args.repeats)
    cases = {
        "PBS hessian": (partial(hessian_mode, "highest"), lambda: hessian_loop),
        "PBS reference (κ=1)": (
            lambda: partial_brain_surgeon_reference(W, A, B, SCALE, keep, energy, reg=REF_REG, keep_weight=1.0),
            partial(time_ms, lambda: pbs_reference_loop(layer, keep, energy, n), device, args.repeats),
        ),
    }
    if device.type == "cuda":  # TF32 exists there only; the same float32 per-row loop is its baseline
        cases["PBS hessian" + TF32] = (partial(hessian_mode, "high"), lambda: hessian_loop)
    results = []
    for op, (vectorised, loop) in cases.items():
        vec_ms, vec_all, new_b = time_ms(vectorised, device, args.repeats)
        loop_ms, loop_all, loop_delta = loop()
        err = rel_err(new_b[:n] - B[:n], loop_delta)  # compare ΔB, not B + ΔB (stricter)
        entry = {"section": "pbs", "op": op, "shape": [out_f, in_f], "vectorised_ms": vec_ms}
        entry |= {"vectorised_ms_all": vec_all, **loop_entry(loop_ms, loop_all, n, out_f), "rel_err_delta_b": err}
        results.append(entry)
        print(
            f"  {op} {out_f}x{in_f}: vectorised {vec_ms:.2f} ms, loop {loop_ms:.2f} ms on {n} rows, err {err:.2e}",
            flush=True,
        )
        check(f"{op} {out_f}x{in_f}", err)
    return results


def random_block(block: BlockShape, device: torch.device) -> dict[str, Tensor]:
    return {role: torch.randn(*block.matrix_shape(role), device=device, dtype=DTYPE) * 0.02 for role in ROLES}


def random_energy(block: BlockShape, tokens: int, device: torch.device) -> dict[str, Tensor]:
    """E_c = Σ_tokens x_c² (positive, uneven); q/k/v share one input and gate/up another."""

    def energy(n: int) -> Tensor:
        return tokens * torch.randn(n, device=device, dtype=DTYPE).exp()

    attn, o_in, mlp, down_in = energy(block.hidden), energy(block.hidden), energy(block.hidden), energy(block.ffn)
    return {"q": attn, "k": attn, "v": attn, "o": o_in, "gate": mlp, "up": mlp, "down": down_in}


def role_scores_and_mask(role: str, U: Tensor, energy: Tensor, factor: Companion, head_dim: int) -> Tensor:
    """Vectorised scores + 50% row mask of one matrix, given the block's companion factors."""
    return row_mask(role_scores(U, 0, energy, factor, head_dim), SPARSITY)


def bench_scores(block: BlockShape, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Section 2: foresight_scores + row_mask (50%) for a whole block vs per-row score + sort loops."""
    U = random_block(block, device)
    E = random_energy(block, args.tokens, device)
    head_dim = block.hidden // block.num_heads
    group = block.num_heads // block.num_kv_heads

    def vectorised() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        scores = foresight_scores(U, E, block.num_heads, block.num_kv_heads)
        return scores, {role: row_mask(s, SPARSITY) for role, s in scores.items()}

    vec_ms, vec_all, (scores, keeps) = time_ms(vectorised, device, args.repeats)
    comp_ms, comp_all, tables = time_ms(
        lambda: companion_tables(U, block.num_heads, block.num_kv_heads), device, args.repeats
    )
    geom = HeadGeometry.from_weights(U, block.num_heads, block.num_kv_heads)
    sumsq = {role: companion_sumsq(role, U[role], 0, U[role].shape[0], geom) for role in ROLES if role != "v"}
    factors = companion_factors(sumsq, geom)  # per-role vectorised lines start from the block's companions
    results = []
    loop_total = comp_ms
    for role in ROLES:
        out_f, in_f = block.matrix_shape(role)
        n = min(args.rows_for_loop, out_f)
        one_role = partial(role_scores_and_mask, role, U[role], E[role], factors[role], head_dim)
        role_ms, role_all, _ = time_ms(one_role, device, args.repeats)
        loop = partial(score_mask_loop, role, U[role], E[role], tables, head_dim, group, n)
        loop_ms, loop_all, (loop_scores, loop_keep) = time_ms(loop, device, args.repeats)
        err = rel_err(scores[role][:n], loop_scores)
        mismatch = float((keeps[role][:n] != loop_keep).double().mean())
        entry = {"section": "scores", "block": block.name, "op": f"score + row_mask {role}", "shape": [out_f, in_f]}
        entry |= {"vectorised_ms": role_ms, "vectorised_ms_all": role_all, **loop_entry(loop_ms, loop_all, n, out_f)}
        entry |= {"rel_err_scores": err, "mask_mismatch_fraction": mismatch}
        results.append(entry)
        loop_total += entry["loop_ms_extrapolated"]
        check(f"scores {block.name} {role}", err)
        if mismatch > MAX_MASK_MISMATCH:
            sys.exit(f"FAIL: masks {block.name} {role}: {mismatch:.2e} of entries differ from the per-row loop")
    worst = max(r["rel_err_scores"] for r in results)
    results.append(
        {
            "section": "scores",
            "block": block.name,
            "op": SCORES_BLOCK_OP,
            "shape": [block.hidden, block.ffn, block.num_heads, block.num_kv_heads],
            "vectorised_ms": vec_ms,
            "vectorised_ms_all": vec_all,
            "loop_note": "sum of the 7 extrapolated loops above + companion norms once",
            "loop_companion_tables_ms": comp_ms,
            "loop_companion_tables_ms_all": comp_all,
            "loop_ms_extrapolated": loop_total,
            "rel_err_scores": worst,
        }
    )
    print(
        f"  scores+masks {block.name}: vectorised {vec_ms:.2f} ms, loop (extrapolated) {loop_total:.2f} ms, "
        f"worst rel err {worst:.2e}",
        flush=True,
    )
    return results


def bench_event_block(
    block: BlockShape, args: argparse.Namespace, device: torch.device, earlier: list[dict[str, Any]], precision: str
) -> dict[str, Any]:
    """Section 3: foresight_scores + row_mask + partial_brain_surgeon for all seven matrices of one block, with
    PBS under torch's float32 matmul `precision` ("highest": float32; "high": TF32 products on CUDA).

    The per-row loop estimate is the sum of the extrapolated (float32) loops measured in sections 1 and 2.
    """
    layers = {role: random_layer(*block.matrix_shape(role), device) for role in ROLES}
    hessians = {
        "attn_in": random_hessian(block.hidden, args.tokens, device),
        "o_in": random_hessian(block.hidden, args.tokens, device),
        "mlp_in": random_hessian(block.hidden, args.tokens, device),
        "down_in": random_hessian(block.ffn, args.tokens, device),
    }
    U = {role: effective(layer) for role, layer in layers.items()}
    E = {role: hessians[H_GROUP[role]].diagonal().clone() for role in ROLES}

    def event() -> dict[str, Tensor]:
        scores = foresight_scores(U, E, block.num_heads, block.num_kv_heads)
        new_b = {}
        for role in ROLES:
            lay = layers[role]
            keep = row_mask(scores[role], SPARSITY)
            with float32_matmul_precision(precision):
                new_b[role] = partial_brain_surgeon(
                    lay["W"], lay["A"], lay["B"], SCALE, keep, hessians[H_GROUP[role]], reg=PBS_REG
                )
        return new_b

    vec_ms, vec_all, _ = time_ms(event, device, args.repeats)
    pbs_loop = {tuple(r["shape"]): r["loop_ms_extrapolated"] for r in earlier if r["op"] == "PBS hessian"}
    score_loop = next(
        r["loop_ms_extrapolated"] for r in earlier if r["op"] == SCORES_BLOCK_OP and r["block"] == block.name
    )
    loop_ms = score_loop + sum(pbs_loop[block.matrix_shape(role)] for role in ROLES)
    suffix = TF32 if precision == "high" else ""
    print(
        f"  event block {block.name}{suffix}: vectorised {vec_ms:.2f} ms, loop (extrapolated) {loop_ms:.2f} ms",
        flush=True,
    )
    return {
        "section": "block",
        "block": block.name,
        "op": "block total: foresight_scores + row_mask + PBS hessian (7 matrices)" + suffix,
        "shape": [block.hidden, block.ffn, block.num_heads, block.num_kv_heads],
        "vectorised_ms": vec_ms,
        "vectorised_ms_all": vec_all,
        "loop_ms_extrapolated": loop_ms,
        "loop_note": "sum: block score loop + 7 extrapolated PBS hessian loops of section 1",
    }


# ---------------------------------------------------------------------------------------------- reporting


def fmt_shape(entry: dict[str, Any]) -> str:
    shape = entry["shape"]
    if entry["section"] == "pbs" or "total_rows" in entry:
        return f"{shape[0]}×{shape[1]}"
    return f"{entry['block']} (hidden {shape[0]}, FFN {shape[1]}, {shape[2]}/{shape[3]} heads)"


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        "# ForeSight scoring and PBS: vectorised vs per-row Python loop",
        "",
        f"- device: {meta['device_name']} ({meta['device']}); torch {meta['torch']}; date {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- float32 weights and H (TF32 matmul outside the TF32 lines: {meta['tf32_matmul']}); lines marked "
        f"'{TF32.strip()}' run PBS under `pbs.matmul_precision: high` (TF32 tensor cores for its float32 products, "
        f"CUDA only) against the same float32 per-row loop; LoRA r={RANK}, s={SCALE:g}; "
        f"H = XᵀX from {meta['tokens']} random tokens; {SPARSITY:.0%} per-row sparsity",
        f"- times: median of {meta['repeats']} runs after 1 warm-up, synchronised. **Per-row loop times are "
        f"extrapolated linearly** from the first {meta['rows_for_loop']} rows of each matrix (× rows / N).",
        "- per-role score lines: vectorised = role_scores + row_mask given the block's companion factors (computed "
        "once, outside the per-role time); loop = per row: score, stable argsort, prune the lowest.",
        "- block lines: vectorised is one measured run over all seven "
        "matrices; the loop column is a sum of extrapolated per-matrix loops, as noted in the cell.",
        "- not timed: collecting H and E (calibration forward), forming U = W + s·B·A.",
        "",
        "| op | shape (out×in) | vectorised ms | per-row loop ms (extrapolated from N rows) | loop / vectorised "
        "| rel. err. |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        vec = r.get("vectorised_ms")
        loop = r["loop_ms_extrapolated"]
        n = f" (from {r['loop_rows']} of {r['total_rows']} rows)" if "total_rows" in r else f" ({r['loop_note']})"
        ratio = f"{loop / vec:.1f}×" if vec else "–"
        err = next((r[k] for k in ("rel_err_delta_b", "rel_err_scores") if k in r), None)
        err_s = f"{err:.1e}" if err is not None else "–"
        vec_s = f"{vec:.2f}" if vec is not None else "–"
        op = f"**{r['op']}**" if r["section"] == "block" else r["op"]
        lines.append(f"| {op} | {fmt_shape(r)} | {vec_s} | {loop:.2f}{n} | {ratio} | {err_s} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="eval/results/pbs_speed", help="writes <out>.json and <out>.md")
    parser.add_argument("--rows-for-loop", type=int, default=64, help="rows each per-row loop runs on")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=None, help="calibration tokens for H (default 2048; small 256)")
    parser.add_argument("--small", action="store_true", help="tiny shapes: runs on CPU in seconds (script check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (256 if args.small else 2048)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    blocks = SMALL_BLOCKS if args.small else FULL_BLOCKS
    llama2 = blocks[0]
    pbs_shapes = [llama2.matrix_shape(role) for role in ("q", "gate", "down")]

    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "small": args.small,
        "rows_for_loop": args.rows_for_loop,
        "repeats": args.repeats,
        "tokens": args.tokens,
        "rank": RANK,
        "scale": SCALE,
        "sparsity": SPARSITY,
        "dtype": str(DTYPE),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "cpu_threads": torch.get_num_threads(),
        "seed": args.seed,
    }
    print(f"device {meta['device_name']} ({device}), torch {torch.__version__}", flush=True)
    print("1. PBS", flush=True)
    results = []
    for out_f, in_f in pbs_shapes:
        results += bench_pbs_shape(out_f, in_f, args, device)
        free(device)
    print("2. scores + row_mask", flush=True)
    for block in blocks:
        results += bench_scores(block, args, device)
        free(device)
    print("3. scoring + PBS for one block", flush=True)
    for precision in ("highest", "high") if device.type == "cuda" else ("highest",):
        results.append(bench_event_block(llama2, args, device, results, precision))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = markdown(meta, results)
    Path(f"{out}.md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
