"""2-rank worker: one prune event inside a ZeRO-3 engine; rank 0 saves the gathered weights.

With --train-step it first takes one optimizer step (so Adam moments are non-zero) and afterwards checks,
on every rank, through DeepSpeed's safe accessors, that the re-drawn A and B = 0 reached the working
partition, the full copy, the fp32 master, and that the moments follow the reset policy; and that the event
left ZeRO-3's forward bookkeeping as it found it: no module still marked as inside a forward, no parameter
registered as an external parameter of a module, none held or left gathered by the event's passes. (Either makes
a later forward gather parameters that are not its own: on an H200 the next event gathered the whole 7B model at
once, 24 GiB above the training peak.) That check runs without persistent parameters: while no trace is complete,
as in an event, DeepSpeed's own hooks release persistent parameters too, and the next training step gathers them.
"""

import argparse
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

from exert_ds.model.architecture import block_linears, decoder_layers
from exert_ds.model.lora import adapter_seed, fresh_lora_a, lora_parts
from exert_ds.prune.event import run_prune_event
from exert_ds.runtime.dist import finish_launched_rank
from exert_ds.runtime.zero3 import Zero3Backend, local_range, local_values
from tests.event_compare import case_config
from tests.tiny_models import calibration_ids, tiny_lora_model

parser = argparse.ArgumentParser()
parser.add_argument("--family", default="llama-odd")
parser.add_argument(
    "--cases", default="foresight:hessian", help="comma-separated scorer:pbs_mode[:obs], one engine each"
)
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--persistence", type=int, default=0)
parser.add_argument("--policy", default="none")
parser.add_argument("--train-step", action="store_true")
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()


def forward_bookkeeping(model: torch.nn.Module) -> dict[str, tuple]:
    """Per module: is it marked as inside a forward, the ds_ids of its external parameters; per parameter: the
    modules active on it and whether it is gathered."""
    modules = {
        name: (getattr(module._parameters, "_in_forward", False), [p.ds_id for _, p in module.ds_external_parameters()])
        for name, module in model.named_modules()
    }
    params = {name: (sorted(p.ds_active_sub_modules), p.ds_status.name) for name, p in model.named_parameters()}
    return {**modules, **params}


deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
results = {}
for case in args.cases.split(","):
    model = tiny_lora_model(args.family, layers=args.layers)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": args.persistence},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    if args.train_step:
        ids = calibration_ids(n=2, seed=3)[rank : rank + 1]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    before = forward_bookkeeping(engine.module)
    settings = case_config(case, reset_after_prune=args.policy)
    ids = calibration_ids()  # 6 sequences: each rank takes its share
    report, _ = run_prune_event(
        engine.module, Zero3Backend(), settings, ids[rank::world], pbs=settings.pbs.mode != "off"
    )

    if args.train_step:
        after = forward_bookkeeping(engine.module)
        changed = {name: (before[name], state) for name, state in after.items() if state != before[name]}
        assert not changed, (
            f"the event changed ZeRO-3's forward bookkeeping of {len(changed)} modules: {list(changed.items())[:3]}"
        )
        for block in range(len(decoder_layers(engine.module))):
            for role, module in block_linears(engine.module, block).items():
                _, a, b, _ = lora_parts(module)
                want_a = fresh_lora_a(tuple(a.ds_shape), adapter_seed(5, 0, block, role))
                for param, want in ((a, want_a), (b, torch.zeros(b.ds_shape))):
                    rng = local_range(param)
                    flat = want.reshape(-1)[rng.start : rng.end]
                    assert torch.equal(local_values(param), flat), f"partition {block}.{role}"
                    assert torch.equal(safe_get_local_fp32_param(param)[: rng.valid], flat), (
                        f"fp32 master {block}.{role}"
                    )
                    if param.ds_status.name == "AVAILABLE":
                        assert torch.equal(param.data, want), f"full copy {block}.{role}"
                    m = safe_get_local_optimizer_state(param, "exp_avg")[: rng.valid]
                    v = safe_get_local_optimizer_state(param, "exp_avg_sq")[: rng.valid]
                    if rng.valid:
                        assert (torch.count_nonzero(m) == 0) == (args.policy != "none"), f"exp_avg {block}.{role}"
                        assert (torch.count_nonzero(v) == 0) == (args.policy == "zero"), f"exp_avg_sq {block}.{role}"

    weights = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            weights[name] = param.detach().clone()
    results[case] = {"weights": weights, "scalars": report.scalars()}
if rank == 0:
    torch.save(results, Path(args.out))
finish_launched_rank()  # leave the group together, then skip the teardown that can abort a rank
