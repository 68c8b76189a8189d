"""`exert-ds train` and `exert-ds prune`: LoRA fine-tuning inside a DeepSpeed ZeRO-3 engine with the
EfficientXpert prune schedule, and the one-shot prune of a dense model (the post-hoc baselines).

Order of work: config checked (before any process group) → process group → model loaded onto ZeRO-3 →
PEFT LoRA → DeepSpeed engine → data → steps, with prune events planned by schedule.py and run on the
engine's partitions by event.PruneEvent + zero3.Zero3Backend → merged sparse model written.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import set_seed

from exert_ds.config import RunConfig
from exert_ds.data import build_train_dataset, calibration_batch, check_source_files
from exert_ds.errors import ConfigError, user_errors
from exert_ds.evaluation.perplexity import perplexity, text_windows
from exert_ds.evaluation.sparsity import sparsity_report
from exert_ds.model.architecture import geometry
from exert_ds.model.loading import load_model, load_tokenizer
from exert_ds.model.lora import attach_lora
from exert_ds.prune.event import EventReport, PruneEvent, PruneState
from exert_ds.prune.pattern import pattern_problem
from exert_ds.prune.recovery import mask_adapters, merge_masked, unmask_adapters
from exert_ds.prune.schedule import PlannedEvent, one_shot_event, plan_events
from exert_ds.runtime.dist import init_distributed, launched_world_size
from exert_ds.runtime.ds_config import load_ds_config
from exert_ds.runtime.zero3 import Zero3Backend, check_leaf_modules
from exert_ds.storage.atomic import SharedWrite, write_errors
from exert_ds.storage.base_model import base_model_fingerprint
from exert_ds.storage.checkpoint import (
    TrainPosition,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    wait_for_checkpoint,
)
from exert_ds.storage.expert import write_expert
from exert_ds.storage.export import export_expert
from exert_ds.train.event_adapters import EventAdapterWriter

EVENTS_LOG = "events.jsonl"  # per event: sparsity, mask_change and PBS error reduction per role, seconds
EVENT_EXPERTS = "event_experts"  # train.save_event_experts: output_dir/event_experts/event-K


class Logger:
    """TensorBoard scalars and plain log lines, rank 0 only. A TensorBoard write the OS refuses is kept in
    `shared` and raised on every rank at the next `shared.share()` (every rank calls it: _log_step, finish)."""

    def __init__(self, out_dir: Path, rank: int) -> None:
        self.rank = rank
        self.writer = None
        self.folder = out_dir / "tensorboard"
        self.shared = SharedWrite()
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            with self.shared.catch(), write_errors(self.folder):
                self.writer = SummaryWriter(str(self.folder))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None and self.shared.error is None:
            with self.shared.catch(), write_errors(self.folder):
                for key, value in values.items():
                    self.writer.add_scalar(key, value, step)
                self.writer.flush()

    def line(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(text)

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(OSError):  # a refused write was raised already
                self.writer.close()


@dataclass
class Session:
    """Everything a run builds once: the engine, its data, the event runner."""

    cfg: RunConfig
    engine: deepspeed.DeepSpeedEngine
    tokenizer: object
    loader: DataLoader | None
    sampler: DistributedSampler | None
    events: PruneEvent
    calibration: torch.Tensor
    perplexity_windows: torch.Tensor | None
    logger: Logger
    out_dir: Path
    adapter_writer: EventAdapterWriter | None = None


def check_pattern_fits(model: torch.nn.Module, n: int, m: int) -> None:
    """N:M needs M to divide every pruned matrix's input width; say so before any work is done."""
    if not m:
        return
    geo = geometry(model)
    for width, name in (
        (geo.hidden_size, "hidden_size"),
        (geo.intermediate_size, "intermediate_size"),
        (geo.num_heads * geo.head_dim, "num_heads·head_dim"),
    ):
        problem = pattern_problem(0.0, n, m, width, f"the model's {name}")
        if problem:
            raise ConfigError(problem)


def prune_state(
    cfg: RunConfig, events_done: int, ema: dict[str, torch.Tensor], allocation: list[float] | None = None
) -> PruneState:
    """The state between events: the EMA, held in `prune.ema_dtype` (a resumed one comes back in the dtype it was
    held in), and the OWL allocation (a resumed position's); with `prune.ema_shadow`, an empty float32 twin that the
    next event starts from the held values."""
    shadow: dict[str, torch.Tensor] | None = {} if cfg.prune.ema_shadow else None
    dtype = getattr(torch, cfg.prune.ema_dtype)
    return PruneState(events_done=events_done, ema=ema, dtype=dtype, shadow=shadow, allocation=allocation)


def build_session(cfg: RunConfig, with_training_data: bool, adapter: str | None = None) -> Session:
    world = launched_world_size()
    ds_config = load_ds_config(cfg.deepspeed, world)  # checked before the process group starts
    readers = [("calibration", cfg.calibration_sources()), ("eval.perplexity", cfg.eval.perplexity)]
    for what, sources in [("data.train", cfg.data.train if with_training_data else [])] + readers:
        with user_errors(what):  # empty, blank or non-UTF-8 files: named before the process group starts
            for source in sources:
                check_source_files(source)
    if cfg.calibration.num_samples % world:
        raise ConfigError(
            f"config key 'calibration.num_samples' ({cfg.calibration.num_samples}) must be a multiple of the "
            f"world size {world}: every rank takes the same share"
        )
    init_distributed()
    rank = dist.get_rank()
    set_seed(cfg.train.seed)
    out_dir = Path(cfg.train.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    dataset = None
    if with_training_data:  # data and calibration first: their errors come before the (long) model load
        with user_errors("data.train"):
            examples = build_train_dataset(
                cfg.data.train, tokenizer, cfg.data.seq_len, cfg.data.packing, cfg.train.seed
            )
        dataset = examples.whole_batches(ds_config["train_batch_size"])
        if not len(dataset):
            raise ConfigError(
                f"data.train gives {len(examples)} examples of {cfg.data.seq_len} tokens, fewer than one global batch "
                f"(DeepSpeed train_batch_size {ds_config['train_batch_size']}); add data or lower the batch size"
            )
    with user_errors("calibration"):
        ids = calibration_batch(
            cfg.calibration_sources(), tokenizer, cfg.calibration.num_samples, cfg.calibration.seq_len, cfg.train.seed
        )
    windows = None
    if cfg.eval.perplexity:
        with user_errors("eval.perplexity"):
            windows = text_windows(cfg.eval.perplexity, tokenizer, cfg.eval.window, cfg.eval.max_windows)
    engine = build_engine(cfg, ds_config, adapter)
    loader = sampler = None
    if dataset is not None:
        sampler = DistributedSampler(
            dataset, num_replicas=dist.get_world_size(), rank=rank, shuffle=False, drop_last=True
        )
        # its own generator: starting an epoch's iterator must not draw from the global RNG (dropout's stream), or a
        # run resumed mid-epoch would draw once more than the uninterrupted one and its dropout masks would shift
        loader = DataLoader(
            dataset,
            batch_size=engine.train_micro_batch_size_per_gpu(),
            sampler=sampler,
            drop_last=True,
            generator=torch.Generator().manual_seed(cfg.train.seed),
        )
    with user_errors("prune"):
        events = PruneEvent(engine.module, Zero3Backend(), cfg, prune_state(cfg, 0, {}))
    logger = Logger(out_dir, rank)
    share = ids[rank :: dist.get_world_size()]
    writer = None
    if cfg.train.save_event_adapters:
        writer = events.adapter_sink = EventAdapterWriter(engine.module, out_dir, rank)
    return Session(cfg, engine, tokenizer, loader, sampler, events, share, windows, logger, out_dir, writer)


def build_engine(cfg: RunConfig, ds_config: dict, adapter: str | None = None) -> deepspeed.DeepSpeedEngine:
    """The model loaded onto ZeRO-3, PEFT LoRA attached, in a DeepSpeed engine (the process group is up).
    Separate from build_session so that eval/bench_scale.py drives the same engine with its own batches."""
    model, keep_alive = load_model(cfg.model, ds_config)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    with user_errors("model"):
        check_pattern_fits(model, cfg.prune.n, cfg.prune.m)
        model = attach_lora(model, dict(cfg.lora), adapter_dtype=cfg.train.adapter_dtype)
    model._exert_hf_ds_config = keep_alive  # HfDeepSpeedConfig must outlive the model
    if adapter:
        load_adapter_weights(model, adapter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    check_leaf_modules(engine.module)
    return engine


def train_micro_step(engine: deepspeed.DeepSpeedEngine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward, backward and (at the accumulation boundary) the optimizer step of one micro-batch already on
    the engine's device. Returns the loss detached, left on the device: reading it every micro-step would
    make the host wait for the accelerator (_log_step reads a whole log interval at once)."""
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    return loss.detach()


@torch.no_grad()
def load_adapter_weights(model: torch.nn.Module, adapter_dir: str) -> None:
    """Load a trained PEFT adapter (adapter_model.safetensors) into the attached LoRA with PEFT's own
    `load_peft_weights` + `set_peft_model_state_dict` (which maps the saved names onto the adapter's). LoRA already
    partitioned by ZeRO-3 is gathered on every rank, written (every rank loads the same file) and re-partitioned
    from rank 0's copy. Every rank checks the same file against the same model, so a mismatch stops all of them
    with the same one-line ConfigError and no rank waits in a collective."""
    try:
        weights = load_peft_weights(adapter_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--adapter {adapter_dir}: no PEFT adapter there ({str(err).splitlines()[0]})") from err
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    partitioned = [p for p in lora if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0, enabled=bool(partitioned)):
        try:
            result = set_peft_model_state_dict(model, weights)
        except RuntimeError as err:  # torch's load_state_dict: "size mismatch for <name>: ..."
            raise ConfigError(
                f"--adapter {adapter_dir}: does not match this model's LoRA (r or targets differ): "
                f"{' '.join(str(err).split())[:300]}"
            ) from err
    if result.unexpected_keys:
        raise ConfigError(
            f"--adapter {adapter_dir}: {result.unexpected_keys[0]} does not match this model's LoRA (r or targets "
            "differ)"
        )


def assert_at_boundary(engine: deepspeed.DeepSpeedEngine, step: int) -> None:
    """The trainer and the engine agree that `step` optimizer steps are done and no gradient is pending: the state a
    prune event and a checkpoint need. An internal check (a failure is a bug in the training loop, not bad input)."""
    accumulation = engine.gradient_accumulation_steps()
    assert engine.micro_steps % accumulation == 0, (
        f"the engine holds the gradient of {engine.micro_steps % accumulation} of {accumulation} micro-batches, "
        f"pending at step {step}"
    )
    assert engine.global_steps == step, f"the engine took {engine.global_steps} optimizer steps, the trainer {step}"


def run_event(session: Session, planned: PlannedEvent, step: int) -> EventReport:
    assert_at_boundary(session.engine, step)
    report = session.events.run(session.calibration, planned.sparsity, pbs=planned.pbs, ema=planned.ema)
    if session.adapter_writer is not None:
        session.adapter_writer.write()
    if report.allocation is not None:
        blocks = ", ".join(f"{s:.4f}" for s in report.allocation)
        session.logger.line(
            f"prune event {report.event}: OWL allocation measured, block sparsities at the target: {blocks}"
        )
    if session.cfg.train.save_event_experts:
        save_event_expert(session, report, planned.sparsity)
    scalars = {**report.scalars(), "event/sparsity_target": planned.sparsity}
    session.logger.scalars(scalars, step)
    held = sum(r.held for r in report.roles.values())
    pruned = sum(r.pruned for r in report.roles.values())
    session.logger.line(
        f"prune event {report.event} before step {step}: sparsity {pruned / max(held, 1):.4f} "
        f"(target {planned.sparsity:.4f}), pbs={planned.pbs}, ema={planned.ema}, {report.seconds:.1f}s"
    )
    shared = SharedWrite()  # one JSON line per event, kept across resumes (a re-run event appears again)
    if dist.get_rank() == 0:
        record = {"event": report.event, "step": step, "ema_dtype": session.cfg.prune.ema_dtype, **scalars}
        if report.allocation is not None:
            record["owl_allocation"] = report.allocation
        with shared.catch(), write_errors(session.out_dir / EVENTS_LOG):
            session.out_dir.mkdir(parents=True, exist_ok=True)
            with (session.out_dir / EVENTS_LOG).open("a") as log:
                log.write(json.dumps(record) + "\n")
    shared.share()
    return report


def event_expert_dir(output_dir: str | Path, event: int) -> Path:
    return Path(output_dir) / EVENT_EXPERTS / f"event-{event}"


def save_event_expert(session: Session, report: EventReport, sparsity: float) -> Path:
    """Collective. `train.save_event_experts`: the model right after the event of `report` (merged, masked, B = 0) as a
    sparse expert in output_dir/event_experts/event-K, promising the event's sparsity `sparsity` (under an OWL
    allocation, each block's as the event pruned it); a re-run event (after a resume) replaces it."""
    event, prune = report.event, session.cfg.prune
    out = write_expert(
        session.engine.module,
        session.tokenizer,
        event_expert_dir(session.out_dir, event),
        sparsity,
        prune.n,
        prune.m,
        base_model=base_model_fingerprint(session.cfg.model),
        block_sparsity=report.block_sparsity,
    )
    session.logger.line(f"wrote {out} (the model after prune event {event})")
    return out


def held_out_perplexity(session: Session) -> float | None:
    if session.perplexity_windows is None:
        return None
    backend = Zero3Backend()
    try:
        result = perplexity(
            session.engine.module,
            session.perplexity_windows,
            session.cfg.eval.micro_batch,
            backend.rank,
            backend.world,
            backend.all_reduce,
        )
    finally:  # ZeRO-3 keeps parameters gathered after no-grad forwards: free them before training goes on
        session.engine.empty_partition_cache()
    return result["perplexity"]


def finish(session: Session, dense_ppl: float | None, pruned: bool) -> Path | None:
    """Measure, report and save the sparse expert (after the final event: B = 0, weights merged and masked):
    every rank writes its partition to output_dir/expert in parallel, then rank 0 streams that into the Hugging
    Face directory output_dir/final, checking the sparsity the schedule promised (none when not `pruned`)."""
    session.logger.shared.share()  # a refused TensorBoard write (prune events log too) stops every rank here
    sparsity = sparsity_report(session.engine.module, Zero3Backend().all_reduce)["roles"]
    summary = {
        "measured_sparsity": sparsity,
        "dense_perplexity": dense_ppl,
        "sparse_perplexity": held_out_perplexity(session),
    }
    prune = session.cfg.prune
    promise = (prune.sparsity, prune.n, prune.m) if pruned else (0.0, 0, 0)
    expert = write_expert(
        session.engine.module,
        session.tokenizer,
        session.out_dir / "expert",
        *promise,
        base_model=base_model_fingerprint(session.cfg.model),
        block_sparsity=session.events.state.allocation if pruned else None,
    )
    out, error = None, None
    if dist.get_rank() == 0:
        try:
            out = export_expert(expert, session.out_dir / "final", overwrite=True)
        except Exception as err:  # any failure reaches every rank: none is left waiting in a collective
            error = err
    failures: list[tuple[bool, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else (isinstance(error, ConfigError), str(error)))
    if failures[0]:
        bad_input, message = failures[0]
        if bad_input:  # the run's work is safe in the expert: say how to export it once the cause is fixed
            raise ConfigError(f"{message}; the sparse expert is saved: exert-ds export --ckpt {expert} --out DIR")
        if error is not None:
            raise error  # rank 0 keeps its traceback
        raise RuntimeError(f"the export to {session.out_dir / 'final'} failed on rank 0: {message}")
    shared = SharedWrite()
    if dist.get_rank() == 0:
        with shared.catch(), write_errors(session.out_dir / "summary.json"):
            (session.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    shared.share()
    if dist.get_rank() == 0:
        roles = ", ".join(f"{role} {value:.4f}" for role, value in sparsity.items())
        session.logger.line(f"measured sparsity per role: {roles}")
        if dense_ppl is not None:
            session.logger.line(
                f"held-out perplexity: dense {dense_ppl:.3f} -> sparse {summary['sparse_perplexity']:.3f}"
            )
        session.logger.line(f"wrote {expert}, {out} and {session.out_dir / 'summary.json'}")
    session.logger.close()
    return out


def train(cfg: RunConfig, resume: str | None = None, adapter: str | None = None, one_shot: bool = False) -> Path | None:
    """The EfficientXpert run: LoRA training with prune events; writes the merged sparse expert.
    Checkpoints every `train.save_every_steps`, after every event and at the end; `resume` continues one.

    An epoch is ⌊examples / train_batch_size⌋ whole optimizer steps over the seeded order of the examples; the
    examples left over (fewer than one global batch) are dropped every epoch, like DataLoader's drop_last, so no
    optimizer step straddles two epochs and every event and checkpoint falls on an accumulation boundary.

    With `prune.recovery_steps` K, the final event runs before step T (the training steps) and K more steps follow
    with the adapter masked to the kept weights (prune/recovery.py), continuing over the data's next epochs; then
    the masked merge. `one_shot` (exert-ds prune with recovery): T = 0 and the one event is the one-shot prune of
    `prune.scorer` on the model with `adapter` loaded."""
    root = Path(cfg.train.output_dir) / "checkpoints"
    base_model = base_model_fingerprint(cfg.model)  # None for a hub model not downloaded yet
    found = resolve_resume(root, resume, cfg.fingerprint(), base_model) if resume else None  # before any group
    session = build_session(cfg, with_training_data=True, adapter=adapter)
    base_model = base_model or base_model_fingerprint(cfg.model)
    engine, loader, logger = session.engine, session.loader, session.logger
    position = TrainPosition()
    if found:
        position, ema = load_checkpoint(engine, found, cfg.fingerprint(), base_model)
        session.events.state = prune_state(cfg, position.events_done, ema, position.allocation)
        logger.line(f"resumed from {found} at step {position.step}")
        if position.allocation is not None:
            blocks = ", ".join(f"{s:.4f}" for s in position.allocation)
            logger.line(f"OWL allocation restored from the checkpoint: {blocks}")
    else:
        position = replace(position, dense_perplexity=held_out_perplexity(session))  # B = 0: the dense model
    accumulation = engine.gradient_accumulation_steps()
    steps_per_epoch, leftover = divmod(len(loader), accumulation)
    assert not leftover, f"{len(loader)} micro-batches per epoch are not whole steps of {accumulation}"
    recovery = cfg.prune.recovery_steps
    if one_shot:
        total = 0
        plan = [one_shot_event(cfg.prune.sparsity, pbs=cfg.pbs.mode != "off")]
    else:
        total = min(cfg.train.max_steps or steps_per_epoch * cfg.train.epochs, steps_per_epoch * cfg.train.epochs)
        plan = plan_events(cfg.prune, total, steps_per_epoch, cfg.pbs.at_final)
    end = total + recovery
    epochs = (0 if one_shot else cfg.train.epochs) + math.ceil(recovery / steps_per_epoch)  # data epochs opened
    logger.line(
        f"training {total} steps ({steps_per_epoch} per epoch), prune events before steps {[e.step for e in plan]}"
        + (f", then {recovery} recovery steps with the adapter masked to the kept weights" if recovery else "")
    )
    plan = plan[position.events_done :]
    finished = position.epoch >= epochs  # resumed from the final checkpoint: merged already
    if recovery and not plan and not finished:  # resumed inside the recovery
        mask_adapters(engine.module)
    schedule_end = getattr(engine.lr_scheduler, "total_num_steps", None)  # decaying DeepSpeed schedulers have one
    if recovery and schedule_end is not None and schedule_end < end:
        logger.line(
            f"warning: the DeepSpeed scheduler's total_num_steps ({schedule_end}) ends before the last recovery step "
            f"({end}): the recovery steps run at its final learning rate (0 for WarmupDecayLR: no recovery at all); raise "
            f"total_num_steps to {end} to include them"
        )

    def checkpoint(epoch: int, micro: int) -> None:
        nonlocal position
        if one_shot:  # exert-ds prune has no --resume: its checkpoints could only be taken for a training run's
            return
        assert_at_boundary(engine, step)
        state = session.events.state
        position = replace(
            position, step=step, epoch=epoch, micro=micro, events_done=state.events_done, allocation=state.allocation
        )
        save_checkpoint(
            engine, session.events.state.ema, position, root, cfg.fingerprint(), cfg.train.keep_checkpoints, base_model
        )

    step, tokens, started, losses = position.step, 0, time.perf_counter(), []
    bar = tqdm(total=end, initial=step, desc="train", disable=dist.get_rank() != 0)
    engine.train()
    for epoch in range(position.epoch, epochs):
        session.sampler.set_epoch(epoch)
        for micro, batch in enumerate(loader):
            if step >= end:
                break
            if epoch == position.epoch and micro < position.micro:
                continue  # consumed before the checkpoint we resumed from
            if micro % accumulation == 0:
                while plan and plan[0].step == step:
                    planned = plan.pop(0)
                    run_event(session, planned, step)
                    if planned.final and recovery:
                        mask_adapters(engine.module)
                    checkpoint(epoch, micro)
                    engine.train()
            tokens += int(batch["attention_mask"].sum())  # counted on the host copy: no device sync
            losses.append(train_micro_step(engine, {k: v.to(engine.device) for k, v in batch.items()}))
            if (micro + 1) % accumulation:
                continue
            step += 1
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == end:
                _log_step(session, step, losses, tokens, started)
                losses, tokens, started = [], 0, time.perf_counter()
            if cfg.train.save_every_steps and step % cfg.train.save_every_steps == 0 and not (recovery and step == end):
                checkpoint(epoch, micro + 1)  # (the last recovery step's would carry the final checkpoint's name)
    bar.close()
    for planned in plan:  # the final event (and any planned at the very end)
        run_event(session, planned, step)
    if recovery and not finished:
        merge_masked(engine.module, Zero3Backend())
        unmask_adapters(engine.module)
        logger.line(f"merged the adapter of {recovery} recovery steps into the kept weights (mask unchanged)")
    if not cfg.prune.enabled:  # dense LoRA: merge only (an event at sparsity 0)
        session.events.run(session.calibration, 0.0, pbs=False, ema=False, progress=False)
        if session.adapter_writer is not None:
            session.adapter_writer.write()
    checkpoint(epochs, 0)
    wait_for_checkpoint()  # the last write is complete (or its failure raised) before the expert is written
    return finish(session, position.dense_perplexity, pruned=cfg.prune.enabled)


def _log_step(session: Session, step: int, losses: list[torch.Tensor], tokens: int, started: float) -> None:
    total = float(torch.stack(losses).double().sum())  # the one host sync per log interval
    stats = torch.tensor([total, len(losses), tokens], dtype=torch.float64)
    Zero3Backend().all_reduce(stats)
    loss = float(stats[0] / stats[1])
    seconds = time.perf_counter() - started
    lr = session.engine.get_lr()[0] if session.engine.get_lr() else 0.0
    peak = get_accelerator().max_memory_allocated() / 2**30
    session.logger.scalars(
        {
            "train/loss": loss,
            "train/lr": lr,
            "train/tokens_per_s": float(stats[2]) / seconds,
            "train/peak_mem_gib": peak,
        },
        step,
    )
    session.logger.shared.share()
    session.logger.line(
        f"step {step}: loss {loss:.4f}, lr {lr:.2e}, {float(stats[2]) / seconds:.0f} tokens/s, peak {peak:.1f} GiB (rank 0)"
    )


def prune_once(cfg: RunConfig, adapter: str | None = None) -> Path | None:
    """One-shot prune event (any scorer) on a dense model, with or without a trained adapter, then save. With
    `prune.recovery_steps`, the masked recovery follows on data.train, as `train` runs it, without checkpoints."""
    if cfg.prune.recovery_steps:
        return train(cfg, adapter=adapter, one_shot=True)
    session = build_session(cfg, with_training_data=False, adapter=adapter)
    planned = one_shot_event(cfg.prune.sparsity, pbs=cfg.pbs.mode != "off")
    dense_ppl = held_out_perplexity(session)
    run_event(session, planned, 0)
    return finish(session, dense_ppl, pruned=True)
