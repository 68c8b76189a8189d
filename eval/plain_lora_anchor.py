"""The speed anchor for the training step: plain PyTorch + PEFT LoRA on ONE GPU, no DeepSpeed.

Copied from the project's shared tools (shared/tools/plain_lora_anchor.py, issue 19) so that it travels with the
checkout; --calib-forward and --liger are additions (the prune event's reference pass, and the same fused kernels
the trainer can use).

LLaMA-2-7B-shaped random bf16 model (a config.json folder, e.g. eval/configs/llama2_7b_shape), SDPA attention,
PEFT LoRA (r=16, alpha=32, dropout 0, the seven projections; same as eval/bench_common.py), LoRA weights bf16,
fused torch AdamW on the LoRA parameters only, grad-norm clip 1.0 (as ds_configs/zero3_bf16.json), labels =
inputs (HF's own causal-LM loss), random token ids (rotated among 4 batches). Each variant: --warmup untimed
steps, then --steps timed steps (device synchronised around each step, wall clock), median s/step.

FLOPs convention (the project's, eval/bench_scale.py): N = elements of the base linear weights (all projections
+ LM head; no embedding, no LoRA). MFU(4N) = 4 N tokens/s / peak (forward 2N + input-grad backward 2N); with
recompute the hardware also runs another 2N (HFU = 6N). "6N-convention MFU" = 6 N tokens/s / peak (the full
fine-tuning convention some papers quote for LoRA too). Peak = 989 TFLOP/s (H200 dense bf16 datasheet, the
project's), plus the ratio to a bf16 8192^3 matmul measured in the same process.

  python3 eval/plain_lora_anchor.py --config-dir eval/configs/llama2_7b_shape --variant 8:0 --variant 4:1 --out r.json
  python3 eval/plain_lora_anchor.py ... --compile regional --variant 8:0      (torch.compile of every decoder layer)
Variant = MICRO_BATCH:RECOMPUTE(0|1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_tflops(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    sync(dev)
    return 2 * n**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def base_linear_params(model: torch.nn.Module) -> int:
    return sum(
        m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-dir", required=True)
    p.add_argument("--layers", type=int, default=None, help="cut the model to this many blocks (smoke tests)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--variant", action="append", default=[], help="MICRO_BATCH:RECOMPUTE, e.g. 8:0")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", choices=["none", "regional", "full"], default="none")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--calib-forward",
        default=None,
        metavar="N:T:MB",
        help="also time one no-grad forward over N sequences of T tokens, MB at a time (the prune event's reference)",
    )
    p.add_argument("--liger", action="store_true", help="liger-kernel's RMSNorm, SwiGLU and RoPE (LLaMA family)")
    args = p.parse_args()
    variants = args.variant or ["8:0"]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)

    measured_peak = matmul_tflops(dev)
    cfg = AutoConfig.from_pretrained(args.config_dir)
    cfg._attn_implementation = "sdpa"
    if args.layers:
        cfg.num_hidden_layers = args.layers
    cfg.use_cache = False
    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)  # fmt: skip
    t0 = time.perf_counter()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    n_base = base_linear_params(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.to(dev)
    lora = [q for q in model.parameters() if q.requires_grad]
    for q in lora:  # PEFT may create LoRA in float32: keep it in the model's dtype (DeepSpeed bf16 does the same)
        q.data = q.data.to(dtype)
    n_lora = sum(q.numel() for q in lora)
    opt = torch.optim.AdamW(lora, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=dev.type == "cuda")
    build_s = time.perf_counter() - t0
    compile_note = "eager"
    if args.compile == "regional":
        for layer in model.base_model.model.model.layers:
            layer.compile()
        compile_note = "torch.compile of each decoder layer (regional)"
    elif args.compile == "full":
        model = torch.compile(model)
        compile_note = "torch.compile of the whole model"
    model.train()
    print(
        f"[plain] built in {build_s:.1f}s: N={n_base:,} base linear weights, {n_lora:,} LoRA params, {compile_note}; "
        f"bf16 8192^3 matmul {measured_peak and round(measured_peak, 1)} TFLOP/s",
        flush=True,
    )

    results = []
    meta = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config_dir": args.config_dir,
        "layers": cfg.num_hidden_layers,
        "N_base_linear": n_base,
        "lora_params": n_lora,
        "peak_tflops": args.peak_tflops,
        "measured_bf16_matmul_tflops": measured_peak and round(measured_peak, 1),
        "compile": compile_note,
        "liger": args.liger,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for spec in variants:
        mb, ckpt = (int(x) for x in spec.split(":"))
        inner = model._orig_mod if hasattr(model, "_orig_mod") else model
        if ckpt:
            inner.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.base_model.model.gradient_checkpointing_disable()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        g = torch.Generator(device=dev).manual_seed(1)
        batches = [torch.randint(0, cfg.vocab_size, (mb, args.seq), device=dev, generator=g) for _ in range(4)]
        times, losses = [], []
        first_s = None
        for i in range(args.warmup + args.steps):
            x = batches[i % 4]
            sync(dev)
            t = time.perf_counter()
            out = model(input_ids=x, labels=x)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(lora, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(dev)
            dt = time.perf_counter() - t
            if i == 0:
                first_s = dt
            if i >= args.warmup:
                times.append(dt)
            losses.append(out.loss.item())
        step = statistics.median(times)
        tok = mb * args.seq / step
        r = {
            "variant": spec,
            "micro_batch": mb,
            "recompute": bool(ckpt),
            "seq": args.seq,
            "compile": args.compile,
            "first_step_s": round(first_s, 2),
            "s_per_step_median": round(step, 4),
            "s_per_step_min": round(min(times), 4),
            "s_per_step_max": round(max(times), 4),
            "tokens_per_s": round(tok, 1),
            "mfu_4N": round(4 * n_base * tok / (args.peak_tflops * 1e12), 4),
            "mfu_6N_convention": round(6 * n_base * tok / (args.peak_tflops * 1e12), 4),
            "hfu": round((6 if ckpt else 4) * n_base * tok / (args.peak_tflops * 1e12), 4),
            "achieved_tflops_4N": round(4 * n_base * tok / 1e12, 1),
            "peak_alloc_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
            "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        }
        if measured_peak:
            r["fraction_of_measured_matmul_4N"] = round(4 * n_base * tok / (measured_peak * 1e12), 4)
        results.append(r)
        print("[plain]", json.dumps(r), flush=True)
        del batches, out
        if args.out:  # after every variant, so that a timeout keeps what was measured
            with open(args.out, "w") as fh:
                json.dump({"meta": meta, "results": results}, fh, indent=1)
    if args.calib_forward:
        n, t, mb = (int(x) for x in args.calib_forward.split(":"))
        inner = model._orig_mod if hasattr(model, "_orig_mod") else model
        inner.eval()
        g = torch.Generator(device=dev).manual_seed(2)
        ids = torch.randint(0, cfg.vocab_size, (n, t), device=dev, generator=g)
        seconds = []
        for _ in range(2):  # the first pass warms the kernels up; the second is reported
            sync(dev)
            t_start = time.perf_counter()
            with torch.no_grad():
                for i in range(0, n, mb):
                    inner(input_ids=ids[i : i + mb])
            sync(dev)
            seconds.append(time.perf_counter() - t_start)
        meta["calib_forward"] = {"samples": n, "seq": t, "micro_batch": mb, "seconds": round(seconds[-1], 3),
                                 "first_pass_s": round(seconds[0], 3)}  # fmt: skip
        print("[plain] calibration forward", json.dumps(meta["calib_forward"]), flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"meta": meta, "results": results}, fh, indent=1)
    print(f"{'variant':>8} {'compile':>9} {'s/step':>7} {'tok/s':>8} {'MFU4N':>6} {'MFU6N':>6} {'HFU':>6} {'GiB':>6}")
    for r in results:
        print(
            f"{r['variant']:>8} {r['compile']:>9} {r['s_per_step_median']:7.3f} {r['tokens_per_s']:8.0f} "
            f"{r['mfu_4N']:6.1%} {r['mfu_6N_convention']:6.1%} {r['hfu']:6.1%} {r['peak_alloc_gib'] or 0:6.1f}"
        )


if __name__ == "__main__":
    main()
