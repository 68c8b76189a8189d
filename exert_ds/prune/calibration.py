"""Sequential calibration: the first block's inputs, and the input statistics of a block's linears.

For each linear input X (calibration tokens × in) we accumulate E = Σ_t x_t² (activation energy) and,
when PBS mode hessian or SparseGPT needs it, H = XᵀX, both in float32. Roles that read the same tensor
(q/k/v, gate/up) share one statistic (architecture.STAT_GROUP).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from exert_ds.model.architecture import STAT_GROUP, decoder_layers, decoder_stack


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


def gram(x: Tensor) -> Tensor:
    """XᵀX in float32 (float64 for float64 X). bf16/fp16 activations on CUDA go to the tensor cores with a
    float32 result: every product of two such values is exact in float32, the sums run in the tensor cores'
    float32 accumulators (2.5e-5 largest relative difference from upcasting X first, measured on an H200), at
    about a fourteenth of the time (eval/results/perf.md)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x.T, x, out_dtype=torch.float32)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x.T @ x


class InputStatistics:
    """Forward hooks on a block's linears that accumulate E (and H) per statistic group."""

    def __init__(self, linears: dict[str, nn.Module], want_hessian: bool) -> None:
        self.energy: dict[str, Tensor] = {}
        self.hessian: dict[str, Tensor] = {}
        self.tokens = 0
        self._want_hessian = want_hessian
        self._linears = {group: linears[group] for group in set(STAT_GROUP.values())}

    def _hook(self, group: str):
        def accumulate(_module: nn.Module, args: tuple, _output: Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if group == "q":
                self.tokens += x.shape[0]
            energy = x.to(torch.promote_types(x.dtype, torch.float32)).square().sum(0)
            self.energy[group] = self.energy[group] + energy if group in self.energy else energy
            if self._want_hessian:
                h = gram(x)
                self.hessian[group] = self.hessian[group] + h if group in self.hessian else h

        return accumulate

    @contextmanager
    def recording(self) -> Iterator[InputStatistics]:
        handles = [m.register_forward_hook(self._hook(g)) for g, m in self._linears.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def for_role(self, role: str) -> tuple[Tensor, Tensor | None]:
        group = STAT_GROUP[role]
        return self.energy[group], self.hessian.get(group)
