"""Token-level perplexity over fixed windows of held-out text (evaluation.md), on one process or inside ZeRO-3.

Every window predicts its tokens 1..window-1 from its prefix; the NLL is summed over all predicted tokens of all
windows on all ranks before the exp, so the result does not depend on the micro-batch size or the world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from exert_ds.data import DataSource, packed_windows


def text_windows(
    sources: list[DataSource], tokenizer: PreTrainedTokenizerBase, window: int, max_windows: int | None
) -> torch.LongTensor:
    """The first `max_windows` consecutive windows (num_windows × window) of the sources' packed text.

    Packed as calibration_batch packs (documents + EOS, sources in order) but kept in order and unshuffled,
    so every run and every compared model sees the same tokens.
    """
    windows = packed_windows(sources, tokenizer, window)
    if not windows.shape[0]:
        raise ValueError(f"perplexity needs at least one window of {window} tokens; lower the window or add data")
    return windows[:max_windows]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.LongTensor,
    micro_batch: int,
    rank: int = 0,
    world: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float | int]:
    """exp(total NLL / total predicted tokens) over all windows; with `world` > 1 each rank takes windows[rank::world].

    Under ZeRO-3 every forward is collective, so each rank's share is padded (with zero-weight copies of a
    window) to the same length and hence the same number of forward calls. `reduce` sums a tensor over ranks
    in place (Zero3Backend().all_reduce); None for a single process.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(
            f"perplexity needs at least one window of 2 or more tokens, got windows of shape {tuple(windows.shape)}"
        )
    share = windows[rank::world]
    per_rank = -(-windows.shape[0] // world)
    padded = torch.cat([share, windows[:1].expand(per_rank - share.shape[0], -1)])
    device = next(model.parameters()).device
    stats = torch.zeros(2, dtype=torch.float64)  # summed NLL, predicted tokens
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, per_rank, micro_batch), desc="perplexity", disable=rank != 0):
            ids = padded[start : start + micro_batch].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            real = max(0, share.shape[0] - start)  # rows beyond the share are padding
            targets = ids[:real, 1:]
            stats[0] += F.cross_entropy(
                logits[:real, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            stats[1] += targets.numel()
    finally:
        model.train(was_training)
    if reduce is not None:
        reduce(stats)
    nll = float(stats[0] / stats[1])
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": int(stats[1]), "windows": windows.shape[0]}
