"""2:4 sparse inference speed against dense on one GPU (issue 17 point 2), as ratios measured in one run.

For each model shape (a config.json: LLaMA-2-7B, LLaMA-3-8B): random bf16 weights, every projection pruned 2:4 by
magnitude (the 2 smallest of every group of 4 set to zero), so dense and sparse compute with the same zeros. Three
variants of the same weights: dense (`F.linear`), and torch's semi-structured sparse tensors on cuSPARSELt and on
CUTLASS (`torch.sparse.SparseSemiStructuredTensorCUSPARSELT / CUTLASS.from_dense`, what
`to_sparse_semi_structured` builds). Measured:

- per linear layer (q, k, v, o, gate, up, down shapes): seconds per `F.linear` at prefill sizes
  (1–8 × 2048 tokens) and decode sizes (1 and 16 tokens), and whether the sparse output matches dense within
  torch's bf16 tolerance (`torch.testing.assert_close` defaults: rtol 1.6e-2, atol 1e-5);
- the whole model: prefill tokens/s at 1–8 × 2048 tokens (one forward, logits of the last position only), and
  decode latency per token at batch 1 and 16 (eager HF forward with a KV cache after a 128-token prompt); the
  last-position logits of sparse against dense (relative error, top-1 agreement).

Where a kernel refuses a shape or dtype, its error is recorded in place of the time. Timings: CUDA events around
`--iters` calls after `--warmup` calls, the median of `--repeats`. The JSON (`--out`, default $OUT/inference.json)
is rewritten after every measurement, so a run cut short keeps what it measured; a measurement that the time
budget (`--budget-s`) leaves no room for is recorded as not run. `eval/inference_table.py` turns it into
eval/results/inference.md.

GPU (1× H200, ~5 min):  python3 eval/bench_inference.py --out $OUT/inference.json
CPU check (tiny):        python3 eval/bench_inference.py --shapes eval/configs/tiny_llama_cpu --seq 32 --out x.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from exert_ds.evaluation.sparse_kernels import pruned_linears, semi_structured, semi_structured_weights  # noqa: E402

SHAPES = ("eval/configs/llama2_7b_shape", "eval/configs/llama3_8b_shape")
VARIANTS = ("dense", "cusparselt", "cutlass")
ROLE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated config.json folders")
    p.add_argument("--prefill-batches", default="1,2,4,8", help="sequences per prefill (each --seq tokens)")
    p.add_argument("--decode-batches", default="1,16", help="sequences per decode step")
    p.add_argument("--seq", type=int, default=2048, help="prefill tokens per sequence")
    p.add_argument("--prompt", type=int, default=128, help="decode: prompt tokens before the timed steps")
    p.add_argument("--decode-steps", type=int, default=32, help="decode: timed steps (tokens per sequence)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="calls per timing (per-layer)")
    p.add_argument("--repeats", type=int, default=3, help="timings per measurement; the median is kept")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--no-model", action="store_true", help="per-layer only (skip whole-model prefill/decode)")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting measurements after this many s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="raw JSON (default $OUT/inference.json)")
    args = p.parse_args(argv)
    args.shape_dirs = [s for s in args.shapes.split(",") if s]
    args.prefill = [int(b) for b in args.prefill_batches.split(",") if b]
    args.decode = [int(b) for b in args.decode_batches.split(",") if b]
    args.variant_list = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variant_list) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.out is None:
        if not os.environ.get("OUT"):
            p.error("give --out, or set $OUT")
        args.out = str(Path(os.environ["OUT"]) / "inference.json")
    return args


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def spent(self) -> bool:
        return time.perf_counter() - self.start > self.seconds


def error_text(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int, repeats: int) -> float:
    """Median over `repeats` of (time of `iters` back-to-back calls) / iters, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            begin = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - begin) / iters)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def prune_two_four(weight: Tensor) -> Tensor:
    """Zero the 2 smallest-magnitude values of every group of 4 along the input dimension, in place."""
    groups = weight.view(weight.shape[0], -1, 4)
    groups.scatter_(2, groups.abs().argsort(dim=2)[..., :2], 0)
    return weight


def bf16_match(got: Tensor, want: Tensor) -> dict[str, Any]:
    """Sparse output against dense: torch's bf16 tolerance, and the size of the difference."""
    diff = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)
    record: dict[str, Any] = {"rel_error": float(diff), "max_abs_diff": float((got.float() - want.float()).abs().max())}
    try:
        torch.testing.assert_close(got, want)
        record["match_bf16"] = True
    except AssertionError as err:
        record["match_bf16"] = False
        record["mismatch"] = " ".join(str(err).split())[:300]
    return record


def layer_shapes(config) -> dict[str, tuple[int, int]]:
    """role → (out, in) of the seven projections of a LLaMA-like config."""
    h, f = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (f, h), "up": (f, h), "down": (h, f)}


def weight_variant(weight: Tensor, variant: str) -> Tensor:
    return weight if variant == "dense" else semi_structured(weight, variant)


@torch.no_grad()
def measure_layers(config, args, device: torch.device, budget: Budget, save: Callable[[], None]) -> list[dict]:
    """One row per (role, phase, tokens, variant): seconds per F.linear, or the error."""
    rows: list[dict] = []
    sizes = [("prefill", b * args.seq) for b in args.prefill] + [("decode", b) for b in args.decode]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for role, (out_f, in_f) in layer_shapes(config).items():
        dense_w = prune_two_four(torch.randn(out_f, in_f, device=device, generator=gen).mul_(0.02).bfloat16())
        weights: dict[str, Tensor | str] = {}
        for variant in args.variant_list:
            try:
                weights[variant] = weight_variant(dense_w, variant)
            except Exception as err:  # a backend that refuses the shape or dtype: recorded as measured
                weights[variant] = error_text(err)
        for phase, tokens in sizes:
            x = torch.randn(tokens, in_f, device=device, generator=gen).bfloat16()
            want = F.linear(x, dense_w)
            for variant in args.variant_list:
                row = {"role": role, "shape": [out_f, in_f], "phase": phase, "tokens": tokens, "variant": variant}
                w = weights[variant]
                if budget.spent():
                    row["error"] = "not run: the --budget-s time budget was spent"
                elif isinstance(w, str):
                    row["error"] = w
                else:
                    try:
                        got = F.linear(x, w)
                        if variant != "dense":
                            row |= bf16_match(got, want)
                        row["seconds"] = seconds_per_call(
                            lambda w=w, x=x: F.linear(x, w), device, args.warmup, args.iters, args.repeats
                        )
                        row["tflops"] = 2 * tokens * out_f * in_f / row["seconds"] / 1e12
                    except Exception as err:
                        row["error"] = error_text(err)
                rows.append(row)
            save()
            del x, want
        del weights, dense_w
    return rows


def random_model(config_dir: str, device: torch.device, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    for _, linear in pruned_linears(model):
        prune_two_four(linear.weight.data)
    return model.eval()


def kernels(model, variant: str):
    return contextlib.nullcontext() if variant == "dense" else semi_structured_weights(model, variant)


@torch.no_grad()
def measure_model(model, args, device: torch.device, budget: Budget, save: Callable[[], None]) -> dict[str, list]:
    """Prefill tokens/s and decode seconds per token per variant, and last-position logits against dense."""
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    prompts = {b: torch.randint(0, vocab, (b, args.seq), device=device, generator=gen) for b in args.prefill}
    decode_prompts = {b: torch.randint(0, vocab, (b, args.prompt), device=device, generator=gen) for b in args.decode}
    out: dict[str, list] = {"prefill": [], "decode": [], "logits": []}
    reference = None
    for variant in args.variant_list:
        try:
            context = kernels(model, variant)
            context.__enter__()
        except Exception as err:
            for b in args.prefill:
                out["prefill"].append(
                    {"variant": variant, "batch": b, "tokens": b * args.seq, "error": error_text(err)}
                )
            for b in args.decode:
                out["decode"].append({"variant": variant, "batch": b, "error": error_text(err)})
            save()
            continue
        try:
            for b, ids in prompts.items():
                row: dict[str, Any] = {"variant": variant, "batch": b, "tokens": b * args.seq}
                try:
                    if budget.spent():
                        raise RuntimeError("not run: the --budget-s time budget was spent")
                    logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
                    if b == args.prefill[0]:
                        if variant == "dense":
                            reference = logits.float()
                        elif reference is not None:
                            rel = (logits.float() - reference).norm() / reference.norm()
                            top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
                            out["logits"].append({"variant": variant, "rel_error": float(rel), "top1": float(top1)})
                    row["seconds"] = seconds_per_call(
                        lambda ids=ids: model(input_ids=ids, use_cache=False, logits_to_keep=1),
                        device,
                        1,
                        1,
                        args.repeats,
                    )
                    row["tokens_per_s"] = row["tokens"] / row["seconds"]
                except Exception as err:
                    row["error"] = error_text(err)
                out["prefill"].append(row)
                save()
            for b, ids in decode_prompts.items():
                row = {"variant": variant, "batch": b, "prompt": args.prompt, "steps": args.decode_steps}
                try:
                    if budget.spent():
                        raise RuntimeError("not run: the --budget-s time budget was spent")
                    row["seconds_per_token"] = decode_latency(model, ids, args.decode_steps, device)
                except Exception as err:
                    row["error"] = error_text(err)
                out["decode"].append(row)
                save()
        finally:
            context.__exit__(None, None, None)
    return out


def decode_latency(model, prompt: Tensor, steps: int, device: torch.device) -> float:
    """Seconds per decode step (one new token per sequence) with a KV cache, greedy, after 3 untimed steps."""
    result = model(input_ids=prompt, use_cache=True)
    cache, token = result.past_key_values, result.logits[:, -1:].argmax(-1)
    for _ in range(3):
        result = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = result.past_key_values, result.logits[:, -1:].argmax(-1)
    sync(device)
    begin = time.perf_counter()
    for _ in range(steps):
        result = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = result.past_key_values, result.logits[:, -1:].argmax(-1)
    sync(device)
    return (time.perf_counter() - begin) / steps


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    with contextlib.suppress(Exception):
        env["cusparselt"] = torch.backends.cusparselt.version()
    if device.type == "cuda":
        env["capability"] = list(torch.cuda.get_device_capability(device))
    return env


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = Budget(args.budget_s)
    results: dict[str, Any] = {
        "benchmark": "eval/bench_inference.py",
        "command": shlex.join(["python3", "eval/bench_inference.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": environment(device),
        "settings": {k: getattr(args, k) for k in ("seq", "prompt", "decode_steps", "warmup", "iters", "repeats")},
        "shapes": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    for config_dir in args.shape_dirs:
        name = Path(config_dir).name
        entry: dict[str, Any] = {"config": config_dir}
        results["shapes"][name] = entry
        entry["layers"] = measure_layers(AutoConfig.from_pretrained(config_dir), args, device, budget, save)
        if not args.no_model:
            if budget.spent():
                entry["model_error"] = "not run: the --budget-s time budget was spent"
            else:
                model = random_model(config_dir, device, args.seed)
                entry["model"] = measure_model(model, args, device, budget, save)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        save()
    results["seconds"] = time.perf_counter() - budget.start
    save()
    print(f"wrote {out} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
