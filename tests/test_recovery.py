"""prune.recovery_steps (algorithm.md §8 c, issue 20): the masked LoRA forward against a plain torch computation of
y = W x + ((s·B A) ⊙ (W ≠ 0)) x, its gradients, and the masked merge (no pruned entry written; the merged model
computes what recovery trained). One process; the 2-rank runs are in test_recovery_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from exert_ds.errors import ConfigError
from exert_ds.model.lora import lora_parts
from exert_ds.prune.event import run_prune_event
from exert_ds.prune.recovery import mask_adapters, merge_masked, unmask_adapters
from exert_ds.runtime.access import DenseBackend
from tests.tiny_models import calibration_ids, event_config, tiny_lora_model


def pruned_model(seed: int = 0):
    """A tiny LoRA model after one event at 50% (weights merged and masked, B = 0), then B made non-zero."""
    model = tiny_lora_model("llama-odd", r=4, seed=seed)
    run_prune_event(model, DenseBackend(), event_config(sparsity=0.5), calibration_ids())
    with torch.no_grad():
        for layer in lora_layers(model):
            torch.nn.init.normal_(lora_parts(layer)[2], std=0.05)
    return model


def lora_layers(model) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_masked_forward_and_gradients_match_plain_torch():
    model = pruned_model()
    layer = lora_layers(model)[3]
    weight, a, b, scale = lora_parts(layer)
    x = torch.randn(2, 5, weight.shape[1])
    mask_adapters(model)
    y = layer(x)
    y.square().sum().backward()
    ra, rb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    want = F.linear(x, weight) + F.linear(x, (scale * rb @ ra) * (weight != 0))
    want.square().sum().backward()
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(a.grad, ra.grad)
    torch.testing.assert_close(b.grad, rb.grad)
    assert not torch.equal(y, layer.base_layer(x) + scale * F.linear(F.linear(x, a), b))  # not PEFT's unmasked sum


def test_recovery_steps_then_merge_keep_every_zero_and_the_trained_function():
    model = pruned_model(seed=1)
    zeros = {id(layer): lora_parts(layer)[0] == 0 for layer in lora_layers(model)}
    mask_adapters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = calibration_ids(n=4, length=10, seed=3)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        merge_masked(model, DenseBackend())
        merged = model(input_ids=ids).logits
        unmask_adapters(model)  # PEFT's own forward again: with B = 0 it computes the same
        peft = model(input_ids=ids).logits
    assert all("forward" not in vars(layer) for layer in lora_layers(model))
    for layer in lora_layers(model):
        weight, _, b, _ = lora_parts(layer)
        assert torch.equal(weight == 0, zeros[id(layer)])  # the final mask, exactly: nothing written where pruned
        assert not b.any()
    torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(peft, merged, rtol=0, atol=0)


def test_a_lora_variant_is_refused_in_one_line():
    model = tiny_lora_model("llama-odd", r=4, seed=0)
    lora_layers(model)[0].lora_variant["default"] = object()  # as PEFT marks a DoRA adapter
    with pytest.raises(ConfigError, match="masks plain LoRA.s product B·A only") as err:
        mask_adapters(model)
    assert "\n" not in str(err.value)
