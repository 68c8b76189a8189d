"""One prune event over a PEFT LoRA model, block by block (algorithm.md §5; zero3.md for shards).

Per block: collect E (and H when the scorer or PBS needs it) with the block as it is; score every role from the
block's pre-event effective weights U = W + s·B·A with the registered scorer (scorers.py); EMA; per-row masks;
PBS; merge s·B·A into W and zero the pruned entries (a weight-updating scorer such as SparseGPT does the masks and
the merge's weights itself); re-draw A (seeded), B = 0, apply the optimizer policy; run the pruned block to get the
next block's inputs. The same code runs on one process and on ZeRO-3 shards (access.Backend); each row is decided
by the one process that owns it, on the whole row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from tqdm.auto import tqdm

from exert_ds.config import RunConfig, check_event_sections
from exert_ds.model.architecture import decoder_layers, geometry
from exert_ds.model.lora import adapter_seed, block_lora_layers, fresh_lora_a
from exert_ds.prune.allocation import event_block_sparsities, measure_outlier_ratios, owl_sparsities
from exert_ds.prune.calibration import BlockInputs, InputStatistics, advance_block, capture_block_inputs, run_block
from exert_ds.prune.foresight import ROLES, HeadGeometry, ema_scores, row_mask
from exert_ds.prune.pbs import (
    float32_matmul_precision,
    partial_brain_surgeon_reference,
    partial_brain_surgeon_with_errors,
)
from exert_ds.prune.reconstruct import reconstruct_rows
from exert_ds.prune.scorers import BlockInputsForScoring, MaskScorer, UpdatingScorer, make_scorer
from exert_ds.runtime.access import Backend, LinearAccess


@dataclass
class PruneState:
    """What survives between events: the EMA score of every (block, role), over held elements only, and (OWL) the
    block sparsities.

    Kept in host memory in `dtype` (prune.ema_dtype: float32, or bfloat16 at half the bytes; one value per held
    weight), and checkpointed as held, so a resume continues bit-identically: on the accelerator it would cost as
    much as the weights themselves, for state that is read once per event. The mixing itself is done in float32
    (foresight.ema_scores) and the event's mask is chosen from that float32 result; only what is kept for the next
    event is rounded to `dtype`."""

    events_done: int = 0
    ema: dict[str, Tensor] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    # prune.ema_shadow: the same EMA held in float32 beside `ema` (diagnostic, never checkpointed; a resumed run starts
    # it from the held values), or None when off
    shadow: dict[str, Tensor] | None = None
    # prune.allocation owl: each block's sparsity at the target p (allocation.py), measured at the first event and
    # kept (checkpointed in the training position); None: uniform
    allocation: list[float] | None = None

    @staticmethod
    def key(block: int, role: str) -> str:
        return f"{block}.{role}"


@dataclass
class RoleReport:
    pruned: int = 0  # zeros placed by masks (held elements)
    held: int = 0
    mask_changed: int = 0  # held elements whose keep flag differs from before the event
    pbs_error_before: float = 0.0
    pbs_error_after: float = 0.0
    obs_error_before: float = 0.0  # prune.reconstruct obs: masking alone
    obs_error_after: float = 0.0  # … and with the kept weights updated
    shadow_differs: int = 0  # prune.ema_shadow: held elements whose keep flag the float32 EMA would set otherwise


@dataclass
class EventReport:
    event: int
    seconds: float = 0.0
    roles: dict[str, RoleReport] = field(default_factory=lambda: {r: RoleReport() for r in ROLES})
    shadow: bool = False  # prune.ema_shadow was on: report shadow_differs
    allocation: list[float] | None = None  # prune.allocation owl: the block sparsities, when this event measured them
    block_sparsity: list[float] | None = None  # prune.allocation owl: the sparsity each block was pruned at

    def scalars(self) -> dict[str, float]:
        """Flat name → value for TensorBoard and logs."""
        out = {"event/seconds": self.seconds}
        for role, rep in self.roles.items():
            if rep.held:
                out[f"sparsity/{role}"] = rep.pruned / rep.held
                out[f"mask_change/{role}"] = rep.mask_changed / rep.held
            if rep.pbs_error_before > 0:
                out[f"pbs_error_reduction/{role}"] = 1.0 - rep.pbs_error_after / rep.pbs_error_before
            if rep.obs_error_before > 0:
                out[f"obs_error_reduction/{role}"] = 1.0 - rep.obs_error_after / rep.obs_error_before
            if self.shadow and rep.held:
                out[f"ema_shadow_differs/{role}"] = rep.shadow_differs / rep.held
        return out


def _held(block: Tensor, valid: Tensor | None) -> Tensor:
    return block if valid is None else torch.where(valid, block, torch.zeros_like(block))


def _unheld(mixed: Tensor, scores: Tensor, valid: Tensor | None) -> Tensor:
    """The held elements' values `mixed` (elements held,) back in the block's shape (rows_held, in), zero elsewhere."""
    if valid is None:
        return mixed
    out = torch.zeros_like(scores, dtype=mixed.dtype)
    out[valid] = mixed
    return out


def _rows_of(owned: Tensor | None, block: Tensor) -> Tensor:
    return block if owned is None else block[owned]


class PruneEvent:
    """Runs prune events on `model` through `backend`; keeps the EMA state between events.

    Reads the run config's sections directly: `prune` (scorer, n, m, ema_eta), `pbs`, `calibration.micro_batch`,
    `train.seed` (the adapter re-draw) and `train.reset_after_prune`. The sparsity of each event is not read from
    `prune.sparsity`: it comes from the schedule (schedule.plan_events, with its ramp) as `run`'s argument."""

    def __init__(self, model: nn.Module, backend: Backend, cfg: RunConfig, state: PruneState | None = None):
        check_event_sections(cfg)
        self.model = model
        self.backend = backend
        self.cfg = cfg
        self.scorer = make_scorer(cfg.prune.scorer)
        self.state = state or PruneState()
        if cfg.prune.ema_shadow and self.state.shadow is None:
            self.state.shadow = {}
        geo = geometry(model)
        self.heads = HeadGeometry(geo.num_heads, geo.num_kv_heads, geo.head_dim)
        # called as adapter_sink(event, block, lora_layers, adapters) with each block's gathered (A, B, s) before
        # anything is merged (train.save_event_adapters keeps them: the event re-initialises the adapter)
        self.adapter_sink: Callable[[int, int, dict[str, LoraLayer], dict[str, tuple]], None] | None = None

    @torch.no_grad()
    def run(self, calibration_ids: Tensor, sparsity: float, pbs: bool, ema: bool, progress: bool = True) -> EventReport:
        """One event at `sparsity` (the schedule's, PlannedEvent.sparsity). `calibration_ids`: (N_rank, T), this
        process's share of the N × T calibration token ids. With `prune.allocation: owl` each block is pruned at its
        own sparsity (allocation.event_block_sparsities), the allocation measured first if the state has none."""
        cfg = self.cfg
        event = self.state.events_done
        report = EventReport(event, shadow=self.state.shadow is not None)
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        use_pbs = pbs and cfg.pbs.mode != "off" and not self.scorer.updates_weights
        want_hessian = (
            self.scorer.needs_hessian or (use_pbs and cfg.pbs.mode == "hessian") or cfg.prune.reconstruct == "obs"
        )
        layers = decoder_layers(self.model)
        if cfg.prune.allocation == "owl" and self.state.allocation is None and sparsity > 0:
            ratios = measure_outlier_ratios(
                self.model, self.backend, calibration_ids, cfg.calibration.micro_batch, cfg.prune.owl_threshold
            )
            self.state.allocation = owl_sparsities(ratios, cfg.prune.sparsity, cfg.prune.owl_lambda)
            report.allocation = self.state.allocation
        per_block = event_block_sparsities(self.state.allocation, cfg.prune.sparsity, sparsity, len(layers))
        if self.state.allocation is not None:
            report.block_sparsity = per_block
        inputs = capture_block_inputs(self.model, calibration_ids, cfg.calibration.micro_batch)
        bar = tqdm(range(len(layers)), desc=f"prune event {event}", disable=not progress or self.backend.rank != 0)
        for block in bar:
            inputs = self._prune_block(
                block, layers[block], inputs, event, per_block[block], use_pbs, want_hessian, ema, report
            )
        for rep in report.roles.values():
            counts = self.backend.all_reduce(
                torch.tensor([rep.pruned, rep.held, rep.mask_changed, rep.shadow_differs], dtype=torch.float64)
            )
            rep.pruned, rep.held, rep.mask_changed, rep.shadow_differs = (int(c) for c in counts.tolist())
        self.state.events_done += 1
        self.model.train(was_training)
        report.seconds = time.perf_counter() - start
        return report

    def _prune_block(
        self,
        block: int,
        layer: nn.Module,
        inputs: list[BlockInputs],
        event: int,
        sparsity: float,
        use_pbs: bool,
        want_hessian: bool,
        ema: bool,
        report: EventReport,
    ) -> list[BlockInputs]:
        """Statistics pass, pruning of the block's linears, propagation pass. The pruning's working set (float32
        effective weights, scores, H) is gone before the propagation pass, which holds the calibration share and
        one micro-batch of outputs."""
        lora_layers = block_lora_layers(self.model, block)
        stats = InputStatistics(lora_layers, want_hessian)
        with stats.recording(), self.backend.whole_block(layer):
            run_block(layer, inputs)
        obs_solve = self.scorer.needs_hessian or self.cfg.prune.reconstruct == "obs"  # SparseGPT-style elimination
        stats.reduce(self.backend.all_reduce, hessian_in_float64=obs_solve)
        self._prune_linears(block, lora_layers, stats, event, sparsity, use_pbs, ema, report)
        del stats  # H: (in, in) per input group, not needed to propagate
        with self.backend.whole_block(layer):
            return advance_block(layer, inputs)

    def _prune_linears(
        self,
        block: int,
        lora_layers: dict[str, LoraLayer],
        stats: InputStatistics,
        event: int,
        sparsity: float,
        use_pbs: bool,
        ema: bool,
        report: EventReport,
    ) -> None:
        """Score, mask, PBS and write back every linear of the block, and re-draw its adapter.

        Every row is decided once, by the process that owns it (holds its first element), on the whole row: the
        selection, PBS and a weight-updating scorer see boundary rows completed from the other ranks' fragments, and
        the owner's result is handed to the other ranks that hold part of the row."""
        cfg = self.cfg
        n, m = cfg.prune.n, cfg.prune.m
        access = {role: self.backend.linear(layer) for role, layer in lora_layers.items()}
        adapters = {role: acc.adapter() for role, acc in access.items()}  # A: (r, in), B: (out, r), s
        if self.adapter_sink is not None:
            self.adapter_sink(event, block, lora_layers, adapters)
        effective, previous_keep = {}, {}
        for role, acc in access.items():
            a, b, scale = adapters[role]
            w_block = acc.weight_block()  # (rows_held, in), zero where not held
            rows = slice(acc.row_start, acc.row_start + w_block.shape[0])
            effective[role] = _held(w_block + scale * (b[rows] @ a), acc.valid())  # U block: (rows_held, in)
            previous_keep[role] = w_block != 0  # (rows_held, in)

        scores = {}
        if isinstance(self.scorer, MaskScorer):
            inputs = BlockInputsForScoring(
                effective=effective,
                row_start={role: acc.row_start for role, acc in access.items()},
                out_features={role: acc.shape[0] for role, acc in access.items()},
                energy={role: stats.for_role(role)[0] for role in access},
                heads=self.heads,
                all_reduce=self.backend.all_reduce,
            )
            scores = self.scorer.scores(inputs)  # role → S: (rows_held, in)
        for role in ROLES:
            acc, u_block = access[role], effective[role]
            a, b, scale = adapters[role]
            energy, hessian = stats.for_role(role)  # E: (in,), H: (in, in) or None
            valid, owned = acc.valid(), acc.owned()  # (rows_held, in) / (rows_held,) bool, None = all
            shadow = None  # prune.ema_shadow's float32 EMA: (rows_held, in)
            rows = slice(acc.row_start, acc.row_start + u_block.shape[0])
            if isinstance(self.scorer, UpdatingScorer):
                u_rows = _rows_of(owned, acc.complete_rows(u_block))  # whole owned rows: (rows_owned, in)
                new_rows, keep_rows = self.scorer.prune_rows(u_rows, hessian, sparsity, n, m)
                merged = _from_owners(acc, owned, new_rows.to(u_block.dtype), u_block)  # (rows_held, in)
            else:
                held_scores = _held(scores[role], valid)  # S: (rows_held, in)
                if self.state.shadow is not None:  # before _ema, which overwrites the held state
                    shadow = self._shadow(block, role, held_scores, valid, ema)  # (rows_held, in)
                mixed = self._ema(block, role, held_scores, valid, ema)  # (rows_held, in)
                keep_rows = row_mask(_rows_of(owned, acc.complete_rows(mixed)), sparsity, n, m)  # (rows_owned, in)
                start_rows = None  # the masked weights the merge starts from, when not M ⊙ U: (rows_owned, in)
                if cfg.prune.reconstruct == "obs":
                    start_rows = self._reconstruct(acc, role, u_block, keep_rows, hessian, report)
                delta_b = torch.zeros_like(b)  # ΔB: (out, r)
                if use_pbs:
                    delta_b = self._pbs(acc, role, u_block, keep_rows, a, scale, energy, hessian, report, start_rows)
                start = u_block if start_rows is None else _from_owners(acc, owned, start_rows, u_block)
                merged = start + scale * (delta_b[rows] @ a)  # (rows_held, in), masked below
            keep = _from_owners(acc, owned, keep_rows.to(u_block.dtype), u_block) != 0  # (rows_held, in)
            acc.write_weight_block(merged * keep)
            rep = report.roles[role]
            held = valid if valid is not None else torch.ones_like(keep)
            rep.pruned += int((~keep & held).sum())
            rep.held += int(held.sum())
            rep.mask_changed += int(((keep != previous_keep[role]) & held).sum()) if event > 0 else 0
            if shadow is not None:
                shadow_rows = row_mask(_rows_of(owned, acc.complete_rows(shadow)), sparsity, n, m)  # (rows_owned, in)
                shadow_keep = _from_owners(acc, owned, shadow_rows.to(u_block.dtype), u_block) != 0  # (rows_held, in)
                rep.shadow_differs += int(((shadow_keep != keep) & held).sum())
            new_a = fresh_lora_a(tuple(a.shape), adapter_seed(cfg.train.seed, event, block, role)).to(a.device)
            acc.write_adapter(new_a, torch.zeros_like(b), cfg.train.reset_after_prune)

    def _ema(self, block: int, role: str, scores: Tensor, valid: Tensor | None, ema: bool) -> Tensor:
        """Mix with the previous event's scores (held elements only) and remember the result."""
        key = PruneState.key(block, role)
        held = scores if valid is None else scores[valid]  # (elements held,)
        mixed = ema_scores(held, self.state.ema.get(key) if ema else None, self.cfg.prune.ema_eta)
        self._remember(key, mixed)
        return _unheld(mixed, scores, valid)

    def _shadow(self, block: int, role: str, scores: Tensor, valid: Tensor | None, ema: bool) -> Tensor:
        """prune.ema_shadow: `_ema` with the previous scores held in float32 (the state's float32 twin); a shadow
        missing after a resume starts from the held values."""
        assert self.state.shadow is not None
        key = PruneState.key(block, role)
        held = scores if valid is None else scores[valid]  # (elements held,)
        previous = self.state.shadow.get(key, self.state.ema.get(key)) if ema else None
        mixed = ema_scores(held, previous, self.cfg.prune.ema_eta).float()
        self.state.shadow[key] = mixed.to("cpu", copy=True)
        return _unheld(mixed, scores, valid)

    def _remember(self, key: str, mixed: Tensor) -> None:
        """Keep `mixed` as the EMA of `key` in host memory in the state's dtype (rounded to nearest), written over the
        previous event's tensor in place. A fresh host tensor per event meant fresh pages to fault in on every copy: device-to-host copies were
        24% of a 7B event's time on an H200 (eval/results/perf/2026-11-29/). Pageable, not page-locked: torch's pinned host
        allocator rounds every block up to a power of two, up to twice the EMA's own size, which is already one
        value per held weight."""
        dtype = self.state.dtype
        host = self.state.ema.get(key)
        if host is None or host.shape != mixed.shape or host.dtype != dtype or host.device.type != "cpu":
            self.state.ema[key] = mixed.to(dtype).to("cpu", copy=True)
        else:
            host.copy_(mixed.to(dtype))

    def _reconstruct(
        self, acc: LinearAccess, role: str, u_block: Tensor, keep_rows: Tensor, hessian: Tensor, report: EventReport
    ) -> Tensor:
        """`prune.reconstruct: obs` on the whole rows this process owns: (rows_owned, in), zero where pruned."""
        u_rows = _rows_of(acc.owned(), acc.complete_rows(u_block))  # (rows_owned, in)
        new_rows, before, after = reconstruct_rows(u_rows, keep_rows, hessian)
        errors = self.backend.all_reduce(torch.tensor([before, after], dtype=torch.float64))
        report.roles[role].obs_error_before += float(errors[0])
        report.roles[role].obs_error_after += float(errors[1])
        return new_rows.to(u_block.dtype)

    def _pbs(
        self,
        acc: LinearAccess,
        role: str,
        u_block: Tensor,
        keep_rows: Tensor,
        a: Tensor,
        scale: float,
        energy: Tensor,
        hessian: Tensor | None,
        report: EventReport,
        start_rows: Tensor | None = None,
    ) -> Tensor:
        """ΔB: (out, r) from the rows this process owns (`keep_rows`: their masks, (rows_owned, in)), summed over
        processes so every rank holds the same ΔB (each row written by its owner only). `start_rows`
        (rows_owned, in): the reconstructed weights the merge starts from (mode hessian only)."""
        pbs = self.cfg.pbs
        owned = acc.owned()
        u_rows = _rows_of(owned, acc.complete_rows(u_block))  # (rows_owned, in)
        zeros = torch.zeros(u_rows.shape[0], a.shape[0], dtype=a.dtype, device=a.device)  # (rows_owned, r)
        if pbs.mode == "hessian":
            reg = 1e-2 if pbs.reg is None else pbs.reg
            hessian = hessian.to(u_rows.dtype)  # (in, in): float64 only for an OBS elimination (_prune_block)
            with float32_matmul_precision(pbs.matmul_precision):
                delta_rows, before, after = partial_brain_surgeon_with_errors(
                    u_rows, a, zeros, scale, keep_rows, hessian, reg, start_weight=start_rows
                )
            errors = self.backend.all_reduce(torch.tensor([before, after], dtype=torch.float64))
            report.roles[role].pbs_error_before += float(errors[0])
            report.roles[role].pbs_error_after += float(errors[1])
        else:
            reg = 1e-8 if pbs.reg is None else pbs.reg
            delta_rows = partial_brain_surgeon_reference(
                u_rows, a, zeros, scale, keep_rows, energy, reg, pbs.keep_weight
            )
        delta = torch.zeros(acc.shape[0], a.shape[0], dtype=a.dtype, device=a.device)  # (out, r)
        row_ids = torch.arange(acc.row_start, acc.row_start + u_block.shape[0], device=a.device)  # (rows_held,)
        delta[_rows_of(owned, row_ids)] = delta_rows
        return self.backend.all_reduce(delta)


def _from_owners(acc: LinearAccess, owned: Tensor | None, owned_rows: Tensor, like: Tensor) -> Tensor:
    """The row block (rows_held, in) of per-row results computed by each row's owner: `owned_rows`
    (rows_owned, in) are this process's; a boundary row it does not own comes from the rank that does."""
    if owned is None:
        return owned_rows
    block = torch.zeros_like(like)  # (rows_held, in): zero in rows owned elsewhere
    block[owned] = owned_rows
    return acc.complete_rows(block)


def run_prune_event(
    model: nn.Module,
    backend: Backend,
    cfg: RunConfig,
    calibration_ids: Tensor,
    pbs: bool = True,
    ema: bool = False,
    state: PruneState | None = None,
) -> tuple[EventReport, PruneState]:
    """Convenience: one event at `cfg.prune.sparsity` (the one-shot baselines and tests use it)."""
    event = PruneEvent(model, backend, cfg, state)
    report = event.run(calibration_ids, cfg.prune.sparsity, pbs=pbs, ema=ema)
    return report, event.state
