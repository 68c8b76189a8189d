"""One prune event over a PEFT LoRA model, block by block (algorithm.md §5; zero3.md for shards).

Per block: collect E (and H) with the block as it is; score every role from the block's pre-event
effective weights U = W + s·B·A; EMA; per-row masks; PBS; merge s·B·A into W and zero the pruned
entries; re-draw A (seeded), B = 0, apply the optimizer policy; run the pruned block to get the next
block's inputs. The same code runs on one process and on ZeRO-3 shards (access.Backend).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from tqdm.auto import tqdm

from exert_ds.model.architecture import decoder_layers, geometry
from exert_ds.model.lora import adapter_seed, block_lora_layers, fresh_lora_a
from exert_ds.prune.calibration import BlockInputs, InputStatistics, advance_block, capture_block_inputs, run_block
from exert_ds.prune.foresight import (
    ROLES,
    HeadGeometry,
    check_sparsity,
    companion_factors,
    companion_sumsq,
    ema_scores,
    role_scores,
    row_mask,
)
from exert_ds.prune.pbs import (
    MATMUL_PRECISIONS,
    float32_matmul_precision,
    partial_brain_surgeon_reference,
    partial_brain_surgeon_with_errors,
)
from exert_ds.prune.sparsegpt import sparsegpt_prune
from exert_ds.runtime.access import RESET_POLICIES, Backend, LinearAccess

SCORERS = ("foresight", "wanda", "magnitude", "sparsegpt")
PBS_MODES = ("hessian", "reference", "off")


@dataclass(frozen=True)
class PruneSettings:
    """What an event does; field names follow the run YAML's `prune:` / `pbs:` sections."""

    sparsity: float
    scorer: str = "foresight"
    n: int = 0
    m: int = 0
    pbs_mode: str = "hessian"
    pbs_reg: float | None = None  # default per mode: 1e-2 (hessian, relative), 1e-8 (reference)
    pbs_keep_weight: float = 1.0
    pbs_matmul_precision: str = "highest"
    ema_eta: float = 0.5
    reset_after_prune: str = "none"
    seed: int = 0
    sparsegpt_blocksize: int = 128
    sparsegpt_percdamp: float = 0.01
    micro_batch: int = 4

    def validate(self) -> None:
        if self.scorer not in SCORERS:
            raise ValueError(f"prune.scorer={self.scorer!r}; choose one of {SCORERS}")
        if self.pbs_mode not in PBS_MODES:
            raise ValueError(f"pbs.mode={self.pbs_mode!r}; choose one of {PBS_MODES}")
        if self.pbs_matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"pbs.matmul_precision={self.pbs_matmul_precision!r}; choose one of {MATMUL_PRECISIONS}")
        if self.scorer == "sparsegpt" and self.pbs_mode != "off":
            raise ValueError("prune.scorer=sparsegpt updates the weights itself; set pbs.mode: off")
        if self.reset_after_prune not in RESET_POLICIES:
            raise ValueError(f"optimizer.reset_after_prune={self.reset_after_prune!r}; choose one of {RESET_POLICIES}")
        if not 0.0 < self.ema_eta <= 1.0:
            raise ValueError(f"prune.ema_eta={self.ema_eta} is outside (0, 1]")
        check_sparsity(self.sparsity, self.m or 1, self.n, self.m)


@dataclass
class PruneState:
    """What survives between events: the EMA score of every (block, role), over held elements only.

    Kept in host memory (float32, one value per held weight): on the accelerator it would cost as much as
    the weights themselves in bf16 twice over, for state that is read once per event."""

    events_done: int = 0
    ema: dict[str, Tensor] = field(default_factory=dict)

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


@dataclass
class EventReport:
    event: int
    seconds: float = 0.0
    roles: dict[str, RoleReport] = field(default_factory=lambda: {r: RoleReport() for r in ROLES})

    def scalars(self) -> dict[str, float]:
        """Flat name → value for TensorBoard and logs."""
        out = {"event/seconds": self.seconds}
        for role, rep in self.roles.items():
            if rep.held:
                out[f"sparsity/{role}"] = rep.pruned / rep.held
                out[f"mask_change/{role}"] = rep.mask_changed / rep.held
            if rep.pbs_error_before > 0:
                out[f"pbs_error_reduction/{role}"] = 1.0 - rep.pbs_error_after / rep.pbs_error_before
        return out


def _held(block: Tensor, valid: Tensor | None) -> Tensor:
    return block if valid is None else torch.where(valid, block, torch.zeros_like(block))


def _rows_of(owned: Tensor | None, block: Tensor) -> Tensor:
    return block if owned is None else block[owned]


class PruneEvent:
    """Runs prune events on `model` through `backend`; keeps the EMA state between events."""

    def __init__(self, model: nn.Module, backend: Backend, settings: PruneSettings, state: PruneState | None = None):
        settings.validate()
        self.model = model
        self.backend = backend
        self.settings = settings
        self.state = state or PruneState()
        geo = geometry(model)
        self.heads = HeadGeometry(geo.num_heads, geo.num_kv_heads, geo.head_dim)

    @torch.no_grad()
    def run(self, calibration_ids: Tensor, sparsity: float, pbs: bool, ema: bool, progress: bool = True) -> EventReport:
        """One event at `sparsity`. `calibration_ids`: this process's share of the N × T token ids."""
        s = self.settings
        event = self.state.events_done
        report = EventReport(event)
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        use_pbs = pbs and s.pbs_mode != "off" and s.scorer != "sparsegpt"
        want_hessian = (use_pbs and s.pbs_mode == "hessian") or s.scorer == "sparsegpt"
        inputs = capture_block_inputs(self.model, calibration_ids, s.micro_batch)
        layers = decoder_layers(self.model)
        bar = tqdm(range(len(layers)), desc=f"prune event {event}", disable=not progress or self.backend.rank != 0)
        for block in bar:
            inputs = self._prune_block(
                block, layers[block], inputs, event, sparsity, use_pbs, want_hessian, ema, report
            )
        for rep in report.roles.values():
            counts = self.backend.all_reduce(
                torch.tensor([rep.pruned, rep.held, rep.mask_changed], dtype=torch.float64)
            )
            rep.pruned, rep.held, rep.mask_changed = (int(c) for c in counts.tolist())
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
        for table in (stats.energy, stats.hessian):
            for tensor in table.values():
                self.backend.all_reduce(tensor)
        self._prune_linears(block, lora_layers, stats, event, sparsity, use_pbs, ema, report)
        del stats  # H: in × in float32 per input group, not needed to propagate
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
        """Score, mask, PBS and write back every linear of the block, and re-draw its adapter."""
        s = self.settings
        access = {role: self.backend.linear(layer) for role, layer in lora_layers.items()}
        adapters = {role: acc.adapter() for role, acc in access.items()}
        effective, previous_keep = {}, {}
        for role, acc in access.items():
            a, b, scale = adapters[role]
            w_block = acc.weight_block()
            rows = slice(acc.row_start, acc.row_start + w_block.shape[0])
            effective[role] = _held(w_block + scale * (b[rows] @ a), acc.valid())
            previous_keep[role] = w_block != 0

        scores = self._scores(access, effective, stats) if s.scorer != "sparsegpt" else {}
        for role in ROLES:
            acc, u_block = access[role], effective[role]
            a, b, scale = adapters[role]
            energy, hessian = stats.for_role(role)
            valid = acc.valid()
            if s.scorer == "sparsegpt":
                new_rows, keep = sparsegpt_prune(
                    acc.complete_rows(u_block), hessian, sparsity, s.n, s.m, s.sparsegpt_blocksize, s.sparsegpt_percdamp
                )
                merged = new_rows
            else:
                keep = row_mask(acc.complete_rows(self._ema(block, role, scores[role], valid, ema)), sparsity, s.n, s.m)
                delta_b = torch.zeros_like(b)
                if use_pbs:
                    delta_b = self._pbs(acc, role, u_block, keep, a, scale, energy, hessian, report)
                rows = slice(acc.row_start, acc.row_start + u_block.shape[0])
                merged = (u_block + scale * (delta_b[rows] @ a)) * keep
            acc.write_weight_block(merged)
            rep = report.roles[role]
            held = valid if valid is not None else torch.ones_like(keep)
            rep.pruned += int((~keep & held).sum())
            rep.held += int(held.sum())
            rep.mask_changed += int(((keep != previous_keep[role]) & held).sum()) if event > 0 else 0
            new_a = fresh_lora_a(tuple(a.shape), adapter_seed(s.seed, event, block, role)).to(a.device)
            acc.write_adapter(new_a, torch.zeros_like(b), s.reset_after_prune)

    def _scores(
        self, access: dict[str, LinearAccess], effective: dict[str, Tensor], stats: InputStatistics
    ) -> dict[str, Tensor]:
        """Scores of every role on its row block, held elements only (zero elsewhere)."""
        s = self.settings
        if s.scorer == "magnitude":
            return {role: u.abs() for role, u in effective.items()}
        if s.scorer == "wanda":
            return {role: u.abs() * stats.for_role(role)[0].sqrt()[None, :] for role, u in effective.items()}
        sumsq = {}
        for role in ROLES:
            if role == "v":
                continue
            u = effective[role]
            sumsq[role] = self.backend.all_reduce(
                companion_sumsq(role, u, access[role].row_start, access[role].shape[0], self.heads)
            )
        factors = companion_factors(sumsq, self.heads)
        return {
            role: _held(
                role_scores(u, access[role].row_start, stats.for_role(role)[0], factors[role], self.heads.head_dim),
                access[role].valid(),
            )
            for role, u in effective.items()
        }

    def _ema(self, block: int, role: str, scores: Tensor, valid: Tensor | None, ema: bool) -> Tensor:
        """Mix with the previous event's scores (held elements only) and remember the result."""
        key = PruneState.key(block, role)
        held = scores if valid is None else scores[valid]
        mixed = ema_scores(held, self.state.ema.get(key) if ema else None, self.settings.ema_eta)
        self._remember(key, mixed)
        if valid is None:
            return mixed
        out = torch.zeros_like(scores)
        out[valid] = mixed
        return out

    def _remember(self, key: str, mixed: Tensor) -> None:
        """Keep `mixed` as the EMA of `key` in host memory, float32, written over the previous event's tensor in
        place. A fresh host tensor per event meant fresh pages to fault in on every copy: device-to-host copies were
        24% of a 7B event's time on an H200 (eval/results/perf/2026-11-29/). Pageable, not page-locked: torch's pinned host
        allocator rounds every block up to a power of two, up to twice the EMA's own size, which is already one
        float32 per held weight."""
        host = self.state.ema.get(key)
        if host is None or host.shape != mixed.shape or host.dtype != torch.float32 or host.device.type != "cpu":
            self.state.ema[key] = mixed.to("cpu", torch.float32, copy=True)
        else:
            host.copy_(mixed)

    def _pbs(
        self,
        acc: LinearAccess,
        role: str,
        u_block: Tensor,
        keep: Tensor,
        a: Tensor,
        scale: float,
        energy: Tensor,
        hessian: Tensor | None,
        report: EventReport,
    ) -> Tensor:
        """ΔB for the rows this process owns, summed over processes so every rank holds the same ΔB."""
        s = self.settings
        owned = acc.owned()
        u_rows = _rows_of(owned, acc.complete_rows(u_block))
        keep_rows = _rows_of(owned, keep)
        zeros = torch.zeros(u_rows.shape[0], a.shape[0], dtype=a.dtype, device=a.device)
        if s.pbs_mode == "hessian":
            reg = 1e-2 if s.pbs_reg is None else s.pbs_reg
            with float32_matmul_precision(s.pbs_matmul_precision):
                delta_rows, before, after = partial_brain_surgeon_with_errors(
                    u_rows, a, zeros, scale, keep_rows, hessian, reg
                )
            errors = self.backend.all_reduce(torch.tensor([before, after], dtype=torch.float64))
            report.roles[role].pbs_error_before += float(errors[0])
            report.roles[role].pbs_error_after += float(errors[1])
        else:
            reg = 1e-8 if s.pbs_reg is None else s.pbs_reg
            delta_rows = partial_brain_surgeon_reference(
                u_rows, a, zeros, scale, keep_rows, energy, reg, s.pbs_keep_weight
            )
        delta = torch.zeros(acc.shape[0], a.shape[0], dtype=a.dtype, device=a.device)
        row_ids = torch.arange(acc.row_start, acc.row_start + u_block.shape[0], device=a.device)
        delta[_rows_of(owned, row_ids)] = delta_rows
        return self.backend.all_reduce(delta)


@torch.no_grad()
def measured_sparsity(model: nn.Module, backend: Backend) -> dict[str, float]:
    """Fraction of exact zeros per role over all blocks, read from the base weights themselves (all ranks)."""
    counts = {role: torch.zeros(2, dtype=torch.float64) for role in ROLES}
    for block in range(len(decoder_layers(model))):
        for role, layer in block_lora_layers(model, block).items():
            acc = backend.linear(layer)
            weight, valid = acc.weight_block(), acc.valid()
            held = torch.ones_like(weight, dtype=torch.bool) if valid is None else valid
            counts[role] += torch.tensor([float(((weight == 0) & held).sum()), float(held.sum())], dtype=torch.float64)
    return {role: float(c[0] / c[1]) for role, c in ((r, backend.all_reduce(c)) for r, c in counts.items())}


def run_prune_event(
    model: nn.Module,
    backend: Backend,
    settings: PruneSettings,
    calibration_ids: Tensor,
    pbs: bool = True,
    ema: bool = False,
    state: PruneState | None = None,
) -> tuple[EventReport, PruneState]:
    """Convenience: one event at `settings.sparsity` (the one-shot baselines and tests use it)."""
    event = PruneEvent(model, backend, settings, state)
    report = event.run(calibration_ids, settings.sparsity, pbs=pbs, ema=ema)
    return report, event.state
