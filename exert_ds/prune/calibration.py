"""Sequential calibration: the first block's inputs, and the input statistics of a block's linears.

For each linear input X (calibration tokens × in) we accumulate E = Σ_t x_t² (activation energy) and,
when PBS mode hessian or a scorer needs it, H = XᵀX, both summed in float64 (InputStatistics says why). Roles that read the same tensor
(q/k/v, gate/up) share one statistic (architecture.STAT_GROUP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from exert_ds.model.architecture import decoder_layers, decoder_stack
from exert_ds.roles import STAT_GROUP


class _CaughtBlockInput(Exception):
    """Raised by the capture hook to stop the forward once block 0's inputs are known."""


@dataclass
class BlockInputs:
    """One calibration micro-batch as block 0 (and, after propagation, block k) receives it."""

    hidden: Tensor
    kwargs: dict = field(default_factory=dict)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: Tensor, micro_batch: int) -> list[BlockInputs]:
    """Run the embeddings (and rotary, mask construction) of `model` on `input_ids` (N × T) and return
    the hidden states and keyword arguments that block 0 receives, per micro-batch of sequences.

    The forward is cut short at block 0, so it calls the decoder stack, not the root model: a DeepSpeed
    engine's forward hooks on the root mark every module as inside a forward and only unmark them when the
    root's forward returns. Left marked, every later read of a partitioned weight would gather it and register
    it with a stale module, and the next event would gather the whole model at once. Block 0's capture hook
    goes first, so that no other pre-hook of block 0 runs either."""
    first = decoder_layers(model)[0]
    input_ids = input_ids.to(next(model.parameters()).device)
    caught: list[BlockInputs] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        caught.append(BlockInputs(hidden, rest))
        raise _CaughtBlockInput

    handle = first.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    decoder = decoder_stack(model)
    try:
        for start in range(0, input_ids.shape[0], micro_batch):
            try:
                decoder(input_ids=input_ids[start : start + micro_batch], use_cache=False)
            except _CaughtBlockInput:
                pass
    finally:
        handle.remove()
    return caught


@torch.no_grad()
def run_block(layer: nn.Module, inputs: list[BlockInputs]) -> None:
    """Run the block over every micro-batch and keep none of its outputs: a statistics pass, whose forward hooks
    read what the block's linears receive."""
    for item in inputs:
        layer(item.hidden, **item.kwargs)


@torch.no_grad()
def advance_block(layer: nn.Module, inputs: list[BlockInputs]) -> list[BlockInputs]:
    """Replace each micro-batch's hidden states, in `inputs` itself, by the block's outputs: the next block's
    inputs. One micro-batch at a time, so beside the calibration share only one micro-batch of outputs exists
    (a list of all outputs next to all inputs doubled the event's activation memory)."""
    for i, item in enumerate(inputs):
        out = layer(item.hidden, **item.kwargs)
        inputs[i] = BlockInputs(out[0] if isinstance(out, tuple) else out, item.kwargs)
    return inputs


_SUM_DTYPE = torch.float64  # E and H are summed in float64 (below)
_TOKEN_CHUNK = 2048  # tokens upcast to float64 at once: bounds the float64 copy of X to 2048 × in


class InputStatistics:
    """Forward hooks on a block's linears that accumulate E (and H) per statistic group.

    Both are summed in float64 from inputs upcast to float64, where every product of two float32 (or bf16) values
    is exact and a sum of a few million of them is exact to about 1e-10 relative: whichever way the tokens are split
    into micro-batches and ranks, the sums agree far below float32's resolution. In float32 the order of the sum
    showed through the SparseGPT solve (issue 21's input: 2e-5 relative between micro-batch 4 and 1 on one rank,
    1.8e-5 between 1 and 2 ranks; 3.5e-7 and 3.8e-7 with float64 sums and solve). Cost: the float64 accumulators
    (in × in × 8 bytes per input group) and float64 products, in chunks of 2048 tokens."""

    def __init__(self, linears: dict[str, nn.Module], want_hessian: bool) -> None:
        self.energy: dict[str, Tensor] = {}  # group → E: (in,), float64 until `reduce`
        self.hessian: dict[str, Tensor] = {}  # group → H = XᵀX: (in, in), float64 until `reduce`
        self.tokens = 0
        self._want_hessian = want_hessian
        self._work_dtype = torch.float32
        self._linears = {group: linears[group] for group in set(STAT_GROUP.values())}

    def _hook(self, group: str):
        def accumulate(_module: nn.Module, args: tuple, _output: Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # (tokens, in)
            if group == "q":
                self.tokens += x.shape[0]
            self._work_dtype = torch.promote_types(x.dtype, torch.float32)
            width = x.shape[1]
            energy = self.energy.setdefault(group, x.new_zeros(width, dtype=_SUM_DTYPE))
            hessian = None
            if self._want_hessian:
                hessian = self.hessian.setdefault(group, x.new_zeros(width, width, dtype=_SUM_DTYPE))
            for chunk in x.split(_TOKEN_CHUNK):
                chunk = chunk.to(_SUM_DTYPE)  # (≤ _TOKEN_CHUNK, in)
                energy += chunk.square().sum(0)
                if hessian is not None:
                    hessian.addmm_(chunk.T, chunk)

        return accumulate

    @contextmanager
    def recording(self) -> Iterator[InputStatistics]:
        handles = [m.register_forward_hook(self._hook(g)) for g, m in self._linears.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def reduce(self, all_reduce: Callable[[Tensor], Tensor], hessian_in_float64: bool = False) -> None:
        """Sum E and H over processes, in float64. E is then held in the working precision (float32, float64 for
        float64 activations); H too, unless `hessian_in_float64`: a solve that amplifies roundoff (SparseGPT's) must
        get the float64 sum itself, since rounding it to float32 turns differences far below float32's resolution
        (the forward's own rounding, between micro-batch sizes or world sizes) into whole ulps in some entries."""
        for table, keep in ((self.energy, False), (self.hessian, hessian_in_float64)):
            for group, tensor in table.items():
                reduced = all_reduce(tensor)
                table[group] = reduced if keep else reduced.to(self._work_dtype)

    def for_role(self, role: str) -> tuple[Tensor, Tensor | None]:
        """(E: (in,), H: (in, in) or None) of the role's input."""
        group = STAT_GROUP[role]
        return self.energy[group], self.hessian.get(group)
