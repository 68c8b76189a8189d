"""Issue 8: the trainer's cost over plain ZeRO-3 LoRA, the prune event against a calibration forward, MFU.

One process group, one engine (the trainer's own: ZeRO-3, PEFT LoRA on all seven projections, random
weights from a config.json), measured in this order, each written to --out as soon as it is known:

1. `plain`: LoRA steps with no events: --warmup untimed, then --steps timed; median s/step, tokens/s/GPU,
   MFU, peak memory per rank (accelerator and host).
2. `forward`: one forward pass of the model (no grad, eval mode) over this rank's share of the calibration
   tokens, in --calib-micro-batch sequences at a time, as a prune event reads them; then it frees what ZeRO-3
   keeps gathered after such a pass, as the trainer does after its held-out perplexity.
3. `schedule`: --steps steps with prune events before steps K, 2K, ... (K = --event-every; PBS at every
   event, EMA from the second on, as in schedule.plan_events); wall-clock amortised per step with the events
   included, each event's seconds (and per block), peak memory per rank, and after each step and event the
   memory allocated then and the phase's peak so far (where in the phase its peak is reached). The event /
   forward ratio uses these events (same calibration tokens as `forward`).
4. `event_tf32`: one more event (PBS, EMA) with `pbs.matmul_precision: high` (TF32 products on CUDA), right
   after the schedule's events (float32 products, the default) on the same model and calibration tokens.
5. `hessian_matmul` (CUDA only): XᵀX of one calibration micro-batch, upcast to float32 first, bf16 inputs with a
   float32 result (torch.mm out_dtype), and upcast to float64 (what calibration.InputStatistics does), time and
   difference.
6. `pbs_precision` (CUDA only): PBS hessian on a gate- and a down-shaped matrix, float32 matmuls against TF32,
   time, error reduction and the difference in ΔB.
7. `profile` (with --profile): torch.profiler tables of one training step and one prune event (PBS, EMA).
8. `memory_trace` (with --memory-trace, CUDA only): one more prune event (PBS, EMA) with the allocator's history
   recorded; the peak's allocated memory and the allocation sites live at the peak (eval/memory_trace.py).
9. `collectives` (with --count-collectives): how many collectives of each kind one more event (PBS, EMA) issues,
   per rank (torch.profiler's c10d op counts).
10. `plain` again for each --variant (e.g. `nockpt:8`: no gradient checkpointing, micro-batch 8).
With --plain-only, phases 2–6 are skipped (a step-time comparison, e.g. another --ds-config).
Levers of issue 19, each alone: --liger (liger-kernel's RMSNorm, SwiGLU and RoPE patched into the LLaMA classes
before the model is built), --deepcompile (DeepSpeed's compiled ZeRO-3: `"compile": {"deepcompile": true}` and
`engine.compile()`; its compile cost is in the warm-up steps' seconds), --zero-set KEY=JSON (a zero_optimization key,
e.g. stage3_module_granularity_threshold=100000000). --trace-step records the allocator over one step of the last
plain run (what is live at the step's peak). --profile-step profiles one training step only (no event).

FLOPs convention (MFU): N = elements of the frozen base model's linear weights (all projections and the LM
head, no embedding, no LoRA). A frozen-base LoRA step costs 4N per token (forward 2N, input gradients 2N;
no weight gradients for the base); gradient checkpointing recomputes the forward, +2N. `mfu` counts 4N
(useful work), `hfu` counts what the hardware ran (4N, or 6N with recompute). Attention-score FLOPs and
LoRA FLOPs are not counted. Peak: the dense bf16 peak of the GPU (989 TFLOP/s for H100/H200 SXM) or
--peak-tflops.

Run: deepspeed --num_gpus N eval/bench_scale.py --config-dir eval/configs/llama2_7b_shape --out r.json
CPU check: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 eval/bench_scale.py --config-dir DIR
  --ds-config ds_configs/zero3_cpu.json --dtype float32 --seq 32 --micro-batch 2 --calib-samples 4
  --calib-seq 32 --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from bench_common import (
    BlockTimer,
    Results,
    add_common_args,
    calibration_share,
    collective_counts,
    ds_config,
    environment,
    matmul_params,
    memory_record,
    model_dir_with_layers,
    peak_tflops,
    profile_tables,
    random_batches,
    reset_peaks,
    run_config,
    set_gradient_checkpointing,
    sync,
    timed,
)
from memory_trace import traced_peak
from transformers import set_seed

from exert_ds.prune.event import PruneEvent, PruneState
from exert_ds.prune.pbs import partial_brain_surgeon_with_errors
from exert_ds.prune.schedule import plan_events
from exert_ds.runtime.dist import finish_launched_rank, init_distributed, launched_world_size
from exert_ds.runtime.zero3 import Zero3Backend
from exert_ds.train.trainer import build_engine, train_micro_step


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config-dir", required=True, help="folder with the model's config.json (random weights)")
    parser.add_argument("--layers", type=int, default=None, help="truncate the model to this many blocks")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    parser.add_argument("--event-every", type=int, default=2, help="K: an event before steps K, 2K, ...")
    parser.add_argument("--final-event", action="store_true", help="also run the schedule's final event")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq", type=int, default=2048)
    parser.add_argument("--variant", action="append", default=[], help="extra plain run: ckpt:MB or nockpt:MB")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--memory-trace", action="store_true", help="record the allocator during one more event")
    parser.add_argument("--plain-only", action="store_true", help="only the plain phases (primary and --variant)")
    parser.add_argument("--count-collectives", action="store_true", help="count one more event's collectives")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--liger", action="store_true", help="liger-kernel RMSNorm, SwiGLU, RoPE (LLaMA family)")
    parser.add_argument("--deepcompile", action="store_true", help="DeepSpeed's compiled ZeRO-3 (engine.compile())")
    parser.add_argument("--zero-set", action="append", default=[], metavar="KEY=JSON", help="a zero_optimization key")
    parser.add_argument("--trace-step", action="store_true", help="allocator history of one step (CUDA only)")
    parser.add_argument("--profile-step", action="store_true", help="torch.profiler tables of one training step")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_common_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    for spec in args.variant:
        parse_variant(spec)
    return args


def parse_variant(spec: str) -> tuple[bool, int]:
    mode, _, mb = spec.partition(":")
    if mode not in ("ckpt", "nockpt") or not mb.isdigit() or int(mb) <= 0:
        raise SystemExit(f"--variant {spec!r}: write ckpt:MB or nockpt:MB (MB a positive micro-batch)")
    return mode == "ckpt", int(mb)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        world = launched_world_size()
        self.cfg = run_config(
            args, model_dir_with_layers(args.config_dir, args.layers), args.calib_samples, args.calib_seq
        )
        ds = ds_config(args, world)
        for item in args.zero_set:
            key, _, value = item.partition("=")
            ds["zero_optimization"][key] = json.loads(value)
        if args.deepcompile:
            ds["compile"] = {"deepcompile": True}
        if args.liger:
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)  # fmt: skip
        if args.calib_samples % world:
            raise SystemExit(f"--calib-samples {args.calib_samples} must be a multiple of the world size {world}")
        init_distributed()
        set_seed(args.seed)
        self.engine = build_engine(self.cfg, ds)
        if args.deepcompile:
            self.engine.compile()
        hf_config = self.engine.module.config
        self.vocab = hf_config.vocab_size
        self.n_params = matmul_params(self.engine.module)
        self.peak, self.peak_note = peak_tflops(args.peak_tflops)
        meta = environment(args)
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # torch's, under ZeRO-3's
        meta.update(
            model_config=hf_config.to_dict(),
            ds_config=ds,
            optimizer={"class": type(inner).__name__, "fused": getattr(inner, "defaults", {}).get("fused")},
            flops_convention={
                "N_matmul_params": self.n_params,
                "mfu": "4N FLOPs per token (frozen-base LoRA step, no recompute counted)",
                "hfu": "4N + 2N per token with gradient checkpointing (the recomputed forward)",
                "not_counted": "attention scores (QK^T, AV), LoRA matmuls, optimizer",
                "peak": self.peak_note,
                "peak_tflops": self.peak,
            },
        )
        self.results = Results(args.out, meta)
        self.calibration = calibration_share(self.vocab, args.calib_samples, args.calib_seq, args.seed)
        self.events = PruneEvent(self.engine.module, Zero3Backend(), self.cfg, PruneState())

    def step_seconds(self, batches: list[dict[str, torch.Tensor]], count: int) -> list[float]:
        self.engine.train()
        seconds = []
        for i in range(count):
            seconds.append(timed(partial(train_micro_step, self.engine, batches[i % len(batches)]))[0])
        return seconds

    def plain(self, ckpt: bool, micro_batch: int, name: str) -> float:
        args = self.args
        set_gradient_checkpointing(self.engine, ckpt)
        batches = random_batches(self.vocab, micro_batch, args.seq, 2, args.seed)
        warmup = self.step_seconds(batches, args.warmup)  # with --deepcompile: the compile cost per start
        reset_peaks()
        times = self.step_seconds(batches, args.steps)
        median = statistics.median(times)
        tokens = micro_batch * args.seq / median  # per GPU
        record = {
            "phase": "plain",
            "variant": name,
            "gradient_checkpointing": ckpt,
            "micro_batch": micro_batch,
            "seq": args.seq,
            "step_seconds": times,
            "warmup_step_seconds": warmup,
            "median_step_s": median,
            "tokens_per_s_per_gpu": tokens,
            "tokens_per_s_total": tokens * self.engine.world_size,
            **self.utilisation(tokens, ckpt),
            **memory_record(),
        }
        self.results.add(record)
        return median

    def utilisation(self, tokens_per_s: float, ckpt: bool) -> dict[str, float | None]:
        if not self.peak:
            return {"mfu": None, "hfu": None}
        model = 4 * self.n_params * tokens_per_s / (self.peak * 1e12)
        hardware = (6 if ckpt else 4) * self.n_params * tokens_per_s / (self.peak * 1e12)
        return {"mfu": model, "hfu": hardware}

    def forward(self) -> None:
        model, mb = self.engine.module, self.args.calib_micro_batch
        ids = self.calibration.to(self.engine.device)

        @torch.no_grad()
        def run(rows: torch.Tensor) -> None:
            for start in range(0, rows.shape[0], mb):
                model(input_ids=rows[start : start + mb], use_cache=False)

        model.eval()
        run(ids[:mb])  # warm-up: one micro-batch
        reset_peaks()
        seconds, _ = timed(lambda: run(ids))
        model.train()
        self.engine.empty_partition_cache()  # as the trainer does after its held-out perplexity
        self.results.add(
            {
                "phase": "forward",
                "calibration_tokens_total": self.args.calib_samples * self.args.calib_seq,
                "calibration_tokens_per_rank": int(ids.numel()),
                "seconds": seconds,
                **memory_record(),
            }
        )

    def event(self, sparsity: float, pbs: bool, ema: bool, events: PruneEvent | None = None) -> dict:
        events = events or self.events
        with BlockTimer(self.engine.module) as blocks:
            seconds, report = timed(lambda: events.run(self.calibration, sparsity, pbs=pbs, ema=ema, progress=False))
        scalars = report.scalars()
        return {
            "event": report.event,
            "pbs": pbs,
            "ema": ema,
            "seconds": seconds,
            "block_seconds": blocks.seconds(),
            "block_memory_gib": blocks.memory_gib(),
            "sparsity": {k.split("/")[1]: v for k, v in scalars.items() if k.startswith("sparsity/")},
            "pbs_error_reduction": {k.split("/")[1]: v for k, v in scalars.items() if k.startswith("pbs_error")},
        }

    def schedule(self, ckpt: bool) -> None:
        args = self.args
        set_gradient_checkpointing(self.engine, ckpt)
        plan = [e for e in plan_events(self.cfg.prune, args.steps, args.steps) if args.final_event or not e.final]
        batches = random_batches(self.vocab, args.micro_batch, args.seq, 2, args.seed + 1)
        reset_peaks()
        peaks = [{"after": "start", **memory_record()}]
        step_times, events = [], []
        for step in range(args.steps):
            while plan and plan[0].step == step:
                planned = plan.pop(0)
                events.append(self.event(planned.sparsity, planned.pbs, planned.ema))
                peaks.append({"after": f"event {events[-1]['event']}", **memory_record()})
            step_times += self.step_seconds([batches[step % 2]], 1)
            peaks.append({"after": f"step {step}", **memory_record()})
        for planned in plan:  # the final event, when asked for
            events.append(self.event(planned.sparsity, planned.pbs, planned.ema))
        total = sum(step_times) + sum(e["seconds"] for e in events)
        self.results.add(
            {
                "phase": "schedule",
                "event_every": args.event_every,
                "steps": args.steps,
                "step_seconds": step_times,
                "median_step_s": statistics.median(step_times),
                "events": events,
                "event_seconds": [e["seconds"] for e in events],
                "wall_s": total,
                "amortised_step_s": total / args.steps,
                "peak_so_far": peaks,
                **memory_record(),
            }
        )

    def event_tf32(self) -> None:
        """One event (PBS, EMA) with TF32 PBS products, on the model and EMA state the schedule left."""
        cfg = replace(self.cfg, pbs=replace(self.cfg.pbs, matmul_precision="high"))
        tf32 = PruneEvent(self.engine.module, Zero3Backend(), cfg, self.events.state)
        reset_peaks()
        record = self.event(self.args.sparsity, pbs=self.args.pbs != "off", ema=True, events=tf32)
        self.results.add({"phase": "event_tf32", "pbs_matmul_precision": "high", **record, **memory_record()})

    def profile(self) -> None:
        """torch.profiler tables of one training step and of one prune event (PBS, EMA)."""
        self.profile_step()
        event_tables = profile_tables(self.one_more_event)
        self.results.add({"phase": "profile", "what": "one prune event (PBS, EMA)", "tables": event_tables})

    def profile_step(self) -> None:
        """torch.profiler tables of one training step of the primary setting."""
        args = self.args
        set_gradient_checkpointing(self.engine, args.grad_ckpt)
        batch = random_batches(self.vocab, args.micro_batch, args.seq, 1, args.seed + 2)[0]
        self.engine.train()
        step_tables = profile_tables(lambda: train_micro_step(self.engine, batch))
        self.results.add({"phase": "profile", "what": "one training step", "tables": step_tables})

    def trace_step(self, ckpt: bool, micro_batch: int, name: str) -> None:
        """One training step (`name`'s setting) with the CUDA allocator's history recorded: what is live at its
        peak (rank 0's)."""
        if not torch.cuda.is_available():
            return
        set_gradient_checkpointing(self.engine, ckpt)
        batch = random_batches(self.vocab, micro_batch, self.args.seq, 1, self.args.seed + 3)[0]
        self.engine.train()
        reset_peaks()
        summary = traced_peak(lambda: train_micro_step(self.engine, batch))
        self.results.add({"phase": "step_memory_trace", "variant": name, "rank": 0, **summary, **memory_record()})

    def one_more_event(self) -> None:
        """An event at --sparsity with PBS and EMA on the model as it is: what the profile, trace and count see."""
        self.events.run(self.calibration, self.args.sparsity, pbs=self.args.pbs != "off", ema=True, progress=False)

    def memory_trace(self) -> None:
        """One event (PBS, EMA) with the CUDA allocator's history recorded: what is live at its peak (rank 0's)."""
        if torch.cuda.is_available():
            reset_peaks()
            summary = traced_peak(self.one_more_event)
            self.results.add({"phase": "memory_trace", "rank": 0, **summary, **memory_record()})

    def collectives(self) -> None:
        """Collective calls of one event (PBS, EMA), by c10d op, on rank 0 (every rank issues the same ones)."""
        counts = collective_counts(self.one_more_event)
        self.results.add({"phase": "collectives", "what": "one prune event (PBS, EMA)", "calls": counts})

    def hessian_matmul(self) -> None:
        """XᵀX for one calibration micro-batch at the model's widths: upcast to float32 first vs bf16 inputs with a
        float32 result (the event's path on CUDA). Measured on CUDA only (the bf16 path exists there only)."""
        if torch.cuda.is_available():
            config, rows = self.engine.module.config, self.args.calib_micro_batch * self.args.calib_seq
            shapes = [hessian_matmul(rows, w, "cuda") for w in (config.hidden_size, config.intermediate_size)]
            self.results.add({"phase": "hessian_matmul", "shapes": shapes})

    def pbs_precision(self) -> None:
        """PBS with float32 vs TF32 matmuls on a gate- and a down-shaped matrix (CUDA only, where TF32 exists)."""
        if torch.cuda.is_available():
            config, tokens = self.engine.module.config, self.args.calib_micro_batch * self.args.calib_seq
            hidden, ffn = config.hidden_size, config.intermediate_size
            shapes = [
                pbs_precision(o, i, self.args.lora_r, tokens, self.args.seed, "cuda")
                for o, i in ((ffn, hidden), (hidden, ffn))
            ]
            self.results.add({"phase": "pbs_precision", "shapes": shapes})


def hessian_matmul(rows: int, width: int, device: str) -> dict:
    """XᵀX of a rows × width bf16 X: upcast to float32 first, bf16 inputs with a float32 result (torch.mm out_dtype),
    and upcast to float64 (as calibration.InputStatistics sums H, issue 21): best of 3 seconds and the largest
    difference from the float32 product."""
    x = torch.randn(rows, width, device=device).to(torch.bfloat16)
    reference = x.float().T @ x.float()
    variants = {
        "fp32": lambda: x.float().T @ x.float(),
        "bf16_in_fp32_out": lambda: torch.mm(x.T, x, out_dtype=torch.float32),
        "fp64": lambda: x.double().T @ x.double(),
    }
    row: dict = {"rows": rows, "width": width}
    for name, fn in variants.items():
        try:
            fn()
            seconds = min(timed(fn)[0] for _ in range(3))
            row[name] = {
                "seconds": seconds,
                "max_rel_diff": float((fn() - reference).abs().max() / reference.abs().max()),
            }
        except (RuntimeError, TypeError, NotImplementedError) as err:
            row[name] = {"error": str(err).splitlines()[0][:200]}
    return row


def pbs_precision(out_f: int, in_f: int, r: int, tokens: int, seed: int, device: str) -> dict:
    """PBS mode hessian (the event's own function) on one out_f × in_f matrix at 50% per row, with float32
    matmuls (torch.set_float32_matmul_precision "highest", as the event runs) and with TF32 ("high"): seconds
    (best of 2), the reconstruction-error reduction of each, and the relative difference of their ΔB. The event
    uses "high" when the run sets `pbs.matmul_precision: high`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out_f, in_f, device=device, generator=gen) * 0.02
    a = (torch.rand(r, in_f, device=device, generator=gen) * 2 - 1) / in_f**0.5
    b = torch.randn(out_f, r, device=device, generator=gen) * 1e-3
    x = torch.randn(tokens, in_f, device=device, generator=gen)
    hessian = x.T @ x
    keep = w.abs() >= w.abs().median(dim=1, keepdim=True).values
    run = partial(partial_brain_surgeon_with_errors, w, a, b, 2.0, keep, hessian, 1e-2)
    row: dict = {"shape": [out_f, in_f], "tokens": tokens}
    deltas = {}
    previous = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            run()
            seconds = min(timed(run)[0] for _ in range(2))
            new_b, before, after = run()
            deltas[precision] = new_b - b
            row[precision] = {"seconds": seconds, "error_reduction": 1 - after / before}
    finally:
        torch.set_float32_matmul_precision(previous)
    row["delta_b_rel_diff"] = float((deltas["high"] - deltas["highest"]).norm() / deltas["highest"].norm())
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench = Bench(args)
    bench.plain(args.grad_ckpt, args.micro_batch, "primary")
    if not args.plain_only:
        bench.forward()
        bench.schedule(args.grad_ckpt)
        bench.event_tf32()
        bench.hessian_matmul()
        bench.pbs_precision()
    if args.profile:
        bench.profile()
    if args.memory_trace:
        bench.memory_trace()
    if args.count_collectives:
        bench.collectives()
    if args.profile_step:
        bench.profile_step()
    last = (args.grad_ckpt, args.micro_batch, "primary")
    for spec in args.variant:  # last: the first to go when a time limit cuts the run short
        ckpt, mb = parse_variant(spec)
        bench.plain(ckpt, mb, spec)
        last = (ckpt, mb, spec)
    if args.trace_step:
        bench.trace_step(*last)
    sync()
    if bench.engine.global_rank == 0:
        print(
            f"[bench] wrote {Path(args.out).resolve()}: {json.dumps([m['phase'] for m in bench.results.doc['measurements']])}"
        )
    finish_launched_rank()


if __name__ == "__main__":
    main()
