"""Issue 9, the part two GPUs allow: a LLaMA-3-70B-shaped model truncated to a few blocks under ZeRO-3.

Random bf16 weights (eval/configs/llama3_70b_shape: hidden 8192, 64 heads / 8 KV heads, FFN 28672, vocab
128256) cut to --layers blocks, LoRA r=16 on all seven projections, through the trainer's own engine and
prune event (bench_scale.Bench). Measured, each written to --out as soon as known:

1. `plain`: --warmup + --steps LoRA training steps (s/step, peak memory per rank, host RSS).
2. `block_forward`: each block's forward over this rank's calibration share, as the event runs it
   (calibration.advance_block after capture_block_inputs, the block held gathered for the pass), seconds per block.
3. `event`: one prune event at --sparsity with PBS (mode --pbs, default hessian): seconds, seconds per block
   (BlockTimer), peak accelerator memory per rank and host peak RSS per rank over the event.

eval/perf_table.py turns this into an extrapolation to the full model (80 blocks) on 8 GPUs, stated as such.

Run: deepspeed --num_gpus 2 eval/bench_70b_blocks.py --layers 3 --out r70.json
"""

from __future__ import annotations

import torch
from bench_common import REPO, memory_record, reset_peaks, sync, timed
from bench_scale import Bench, build_parser
from torch import nn

from exert_ds.model.architecture import decoder_layers
from exert_ds.prune.calibration import BlockInputs, advance_block, capture_block_inputs
from exert_ds.runtime.access import Backend
from exert_ds.runtime.dist import finish_launched_rank

DEFAULTS = {
    "config_dir": str(REPO / "eval" / "configs" / "llama3_70b_shape"),
    "layers": 2,
    "warmup": 1,
    "steps": 2,
    "micro_batch": 1,
    "calib_samples": 16,
    "calib_seq": 2048,
    "calib_micro_batch": 2,
}


def held_pass(backend: Backend, layer: nn.Module, inputs: list[BlockInputs]) -> list[BlockInputs]:
    with backend.whole_block(layer):
        return advance_block(layer, inputs)


def block_forward(bench: Bench) -> None:
    """Seconds of each block's forward over the calibration share (statistics-free), block after block."""
    model = bench.engine.module
    model.eval()
    with torch.no_grad():
        inputs = capture_block_inputs(model, bench.calibration, bench.args.calib_micro_batch)
        seconds = []
        for layer in decoder_layers(model):
            took, inputs = timed(lambda layer=layer, inputs=inputs: held_pass(bench.events.backend, layer, inputs))
            seconds.append(took)
    model.train()
    del inputs
    bench.results.add({"phase": "block_forward", "block_seconds": seconds})


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(**DEFAULTS)
    parser.add_argument("--target-blocks", type=int, default=80, help="blocks of the full model (extrapolation)")
    parser.add_argument("--target-gpus", type=int, default=8, help="GPUs of the full run (extrapolation)")
    parser.add_argument("--target-calib-samples", type=int, default=128, help="calibration of the full run")
    args = parser.parse_args(argv)
    bench = Bench(args)
    bench.results.doc["meta"]["extrapolation_target"] = {
        "blocks": args.target_blocks,
        "gpus": args.target_gpus,
        "calib_samples": args.target_calib_samples,
        "calib_seq": args.calib_seq,
    }
    bench.plain(args.grad_ckpt, args.micro_batch, "primary")
    block_forward(bench)
    reset_peaks()
    record = bench.event(args.sparsity, pbs=args.pbs != "off", ema=False)
    bench.results.add({"phase": "event", **record, **memory_record()})
    sync()
    finish_launched_rank()


if __name__ == "__main__":
    main()
