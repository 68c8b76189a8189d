"""2:4 semi-structured sparse kernels for a pruned model: each pruned projection's weight (the seven roles of every
block) swapped for torch's semi-structured sparse tensor (`torch.sparse.to_sparse_semi_structured`), so
`F.linear` runs on the sparse tensor cores through cuSPARSELt or CUTLASS. Used by `exert-ds eval --sparse-kernels
2:4` (quality and speed from the same model) and by eval/bench_inference.py.

torch compresses a weight to 2:4 by keeping 2 values of every group of 4 and drops the rest without a check, so
each weight is checked first: a group with more than 2 non-zeros stops with one line naming the matrix and row.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from exert_ds.errors import ConfigError

PATTERNS = ("2:4",)
BACKENDS = ("default", "cusparselt", "cutlass")  # default: torch's choice (cuSPARSELt where it is built in)


def require_cuda(flag: str = "2:4 sparse kernels") -> None:
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{flag}: torch's semi-structured sparse kernels (cuSPARSELt, CUTLASS) need a CUDA GPU "
            "(compute capability 8.0+); none is visible here"
        )


def check_request(pattern: str, deepspeed_config: str | None) -> None:
    """`exert-ds eval --sparse-kernels PATTERN`, checked before any model loads."""
    if pattern not in PATTERNS:
        raise ConfigError(f"--sparse-kernels {pattern!r}: torch's semi-structured kernels run {', '.join(PATTERNS)}")
    require_cuda(f"--sparse-kernels {pattern}")
    if deepspeed_config:
        raise ConfigError(
            f"--sparse-kernels {pattern} swaps whole weights for sparse tensors; ZeRO-3 partitions them: "
            "leave out --deepspeed (one process, the model on one GPU)"
        )


def check_two_four(name: str, weight: Tensor) -> None:
    """ConfigError naming the matrix and the first row with a group of 4 holding more than 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ConfigError(
            f"{name}: shape {tuple(weight.shape)}; 2:4 kernels need a matrix whose width is a multiple of 4"
        )
    dense_groups = ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) > 2).any(-1)
    if dense_groups.any():
        row = int(dense_groups.nonzero()[0])
        raise ConfigError(
            f"{name} row {row} has a group of 4 with more than 2 non-zeros: not 2:4 sparse (prune with "
            "prune.n: 2, prune.m: 4)"
        )


def semi_structured(weight: Tensor, backend: str = "default") -> Tensor:
    """`weight` (out, in), on CUDA, as a semi-structured sparse tensor of the chosen backend."""
    from torch.sparse import (
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
        to_sparse_semi_structured,
    )

    if backend == "cusparselt":
        return SparseSemiStructuredTensorCUSPARSELT.from_dense(weight)
    if backend == "cutlass":
        return SparseSemiStructuredTensorCUTLASS.from_dense(weight)
    return to_sparse_semi_structured(weight)


def pruned_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(name, Linear) of the seven projections of every block (the pruned ones)."""
    from exert_ds.model.architecture import block_linears, decoder_layers

    for block in range(len(decoder_layers(model))):
        for role, module in block_linears(model, block).items():
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            yield f"layers.{block}.{role}", base


@contextmanager
def semi_structured_weights(model: nn.Module, backend: str = "default") -> Iterator[int]:
    """Inside the block, every pruned projection of `model` (on CUDA) computes with a 2:4 sparse weight; the
    dense weights come back afterwards. Yields the number of matrices swapped. Errors: ConfigError on CPU or for a
    matrix that is not 2:4 or whose shape or dtype torch's kernels refuse."""
    require_cuda()
    kept: list[tuple[nn.Linear, nn.Parameter]] = []
    try:
        for name, linear in pruned_linears(model):
            check_two_four(name, linear.weight)
            try:
                sparse = semi_structured(linear.weight.detach(), backend)
            except (RuntimeError, ValueError) as err:
                first = (str(err).strip().splitlines() or [""])[0]
                raise ConfigError(
                    f"{name}: torch's 2:4 kernels ({backend}) refuse this {linear.weight.dtype} matrix of shape "
                    f"{tuple(linear.weight.shape)}: {first}"
                ) from err
            kept.append((linear, linear.weight))
            linear.weight = nn.Parameter(sparse, requires_grad=False)
        yield len(kept)
    finally:
        for linear, dense in kept:
            linear.weight = dense
