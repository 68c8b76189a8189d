"""Log-likelihood of each label's verbalisation after the task prompt, batched and sharded over ranks.

Every (example, label) pair is one sequence: prompt tokens (with the tokenizer's special tokens) followed by
the label tokens (without), cut from the left to `max_length` so the end of the prompt and the whole label
stay. Sequences are sorted by length and cut into global micro-batches in one fixed order; rank r takes
batches r, r + world, ..., so a batch holds the same rows, padding included, at any world size and every
score is bit-identical to one process. Under ZeRO-3 every forward is collective: ranks with fewer batches
repeat a batch and drop its result, so all make the same number of calls.

Kept by hand because lm-eval (0.4), which computes the same summed label log-likelihood for its `loglikelihood`
requests, runs its own model object (HFLM): every rank holds the whole model and batches its own share of the
requests. It cannot drive a ZeRO-3 engine, whose forwards need every rank in the same call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

Gather = Callable[[object], list]  # every rank's object, in rank order (torch.distributed.all_gather_object)


@dataclass(frozen=True)
class Sequences:
    """Token ids of every (example, label) pair and how many of their last tokens are the label."""

    ids: list[list[int]]
    label_len: list[int]
    num_examples: int
    num_labels: int


def label_token_ids(tokenizer: PreTrainedTokenizerBase, verbalisations: list[str]) -> list[list[int]]:
    """Each verbalisation's tokens; they must be non-empty and distinct or the labels cannot be told apart."""
    ids = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in verbalisations]
    for text, toks in zip(verbalisations, ids, strict=True):
        if not toks:
            raise ValueError(f"label verbalisation {text!r} encodes to no token")
    seen: dict[tuple[int, ...], str] = {}
    for text, toks in zip(verbalisations, ids, strict=True):
        if tuple(toks) in seen:
            raise ValueError(f"label verbalisations {seen[tuple(toks)]!r} and {text!r} encode to the same tokens")
        seen[tuple(toks)] = text
    return ids


def build_sequences(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], verbalisations: list[str], max_length: int
) -> Sequences:
    labels = label_token_ids(tokenizer, verbalisations)
    longest = max(len(t) for t in labels)
    if longest >= max_length:
        raise ValueError(f"a label takes {longest} tokens, not less than --max-length {max_length}; raise it")
    prompt_ids = tokenizer(prompts)["input_ids"]
    ids = [(p + lab)[-max_length:] for p in prompt_ids for lab in labels]
    return Sequences(ids, [len(lab) for _ in prompt_ids for lab in labels], len(prompts), len(labels))


def _batch(rows: list[list[int]], label_len: list[int], pad: int) -> dict[str, torch.Tensor]:
    """Left-padded ids, attention mask and position ids counted from each row's first real token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


@torch.no_grad()
def _score_batch(model: nn.Module, rows: list[list[int]], label_len: list[int], pad: int) -> np.ndarray:
    """Sum of the label tokens' log-probabilities for each row (float64)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in _batch(rows, label_len, pad).items()}
    keep = max(label_len) + 1  # logits of the last `keep` positions predict every label token
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = inputs["input_ids"][:, -keep + 1 :]
    picked = logprobs.gather(-1, targets[..., None])[..., 0].double()
    lengths = torch.tensor(label_len, device=device)
    counted = torch.arange(keep - 1, device=device)[None, :] >= (keep - 1 - lengths)[:, None]
    return (picked * counted).sum(1).cpu().numpy()


def label_loglikelihoods(
    model: nn.Module,
    sequences: Sequences,
    micro_batch: int,
    pad_id: int,
    rank: int = 0,
    world: int = 1,
    gather: Gather | None = None,
) -> np.ndarray:
    """(examples × labels) summed log-probability of each label's tokens after each example's prompt.

    With `world` > 1 each rank scores its batches and `gather` brings every rank's scores to every rank.
    """
    order = sorted(range(len(sequences.ids)), key=lambda i: (-len(sequences.ids[i]), i))
    batches = [order[s : s + micro_batch] for s in range(0, len(order), micro_batch)]
    mine = list(range(rank, len(batches), world))
    calls = -(-len(batches) // world)
    scores: dict[int, np.ndarray] = {}
    was_training = model.training
    model.eval()
    try:
        for step in tqdm(range(calls), desc="scoring", disable=rank != 0):
            b = mine[step] if step < len(mine) else 0  # a repeated batch keeps the collective calls in step
            rows = batches[b]
            result = _score_batch(
                model, [sequences.ids[i] for i in rows], [sequences.label_len[i] for i in rows], pad_id
            )
            if step < len(mine):
                scores[b] = result
    finally:
        model.train(was_training)
    parts = gather(scores) if gather is not None else [scores]
    flat = np.empty(len(order), dtype=np.float64)
    for part in parts:
        for b, values in part.items():
            flat[batches[b]] = values
    return flat.reshape(sequences.num_examples, sequences.num_labels)
