"""What runs only on CUDA: the float64-summed H = XᵀX of bf16/fp16 calibration activations and PBS with TF32 products, each against a
float64 computation of the same formula; the event's EMA copied from the GPU into host memory, against the same
events on CPU. Skipped without a GPU; run on the device (eval/gpu_trainer_runs.sh)."""

import pytest
import torch

from exert_ds.prune.event import PruneEvent
from exert_ds.prune.foresight import row_mask
from exert_ds.prune.pbs import float32_matmul_precision, partial_brain_surgeon_with_errors
from exert_ds.runtime.access import DenseBackend
from tests.tiny_models import calibration_ids, event_config, tiny_lora_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hessian_of_half_precision_activations_is_exact_and_independent_of_the_split(dtype):
    """H = XᵀX of bf16/fp16 activations, summed in float64 on the GPU: the float64 product rounded once to float32,
    bitwise the same whether the tokens come in one micro-batch or in three, in another order."""
    from torch import nn

    from exert_ds.prune.calibration import InputStatistics

    x = (torch.randn(4096, 512, device="cuda") * torch.rand(512, device="cuda") * 3).to(dtype)
    want = (x.double().T @ x.double()).float()
    hessians = []
    for parts in ([x], [x[3000:], x[:1000], x[1000:3000]]):
        linears = {role: nn.Linear(512, 2, device="cuda", dtype=dtype) for role in ("q", "o", "gate", "down")}
        stats = InputStatistics(linears, want_hessian=True)
        with stats.recording():
            for part in parts:
                linears["q"](part)
        stats.reduce(lambda t: t)
        hessians.append(stats.hessian["q"])
    assert hessians[0].dtype == torch.float32
    assert torch.equal(hessians[0], hessians[1])
    assert rel(hessians[0], want.double()) < 1e-7


def test_pbs_with_tf32_products_stays_close_to_float64_and_still_reduces_the_error():
    gen = torch.Generator(device="cuda").manual_seed(0)
    out_f, in_f, r = 512, 1024, 16
    W = torch.randn(out_f, in_f, device="cuda", generator=gen) * 0.02
    A = (torch.rand(r, in_f, device="cuda", generator=gen) * 2 - 1) / in_f**0.5
    B = torch.randn(out_f, r, device="cuda", generator=gen) * 0.01
    X = torch.randn(4096, in_f, device="cuda", generator=gen) * torch.rand(in_f, device="cuda", generator=gen) * 2
    keep = row_mask((W + 2.0 * B @ A).abs() * X.square().sum(0).sqrt(), 0.5)
    H = X.T @ X
    want, _, _ = partial_brain_surgeon_with_errors(W.double(), A.double(), B.double(), 2.0, keep, H.double())
    with float32_matmul_precision("high"):
        got, before, after = partial_brain_surgeon_with_errors(W, A, B, 2.0, keep, H)
    assert rel(got - B, want - B.double()) < 2e-3
    assert after < before


def test_ema_copied_to_host_memory_matches_the_cpu_event_and_is_reused():
    """Two events (the second with EMA) on CUDA and on CPU from the same model: the same host EMA, float32, in host
    buffers that the second event overwrites in place."""
    settings = event_config(sparsity=0.5, scorer="magnitude", pbs_mode="off")
    states = {}
    for device in ("cpu", "cuda"):
        model = tiny_lora_model("llama", dtype=torch.float64).to(device)
        event = PruneEvent(model, DenseBackend(), settings)
        event.run(calibration_ids(), 0.5, pbs=False, ema=False, progress=False)
        first = {key: value.data_ptr() for key, value in event.state.ema.items()}
        with torch.no_grad():  # training between events: a new B
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
        event.run(calibration_ids(), 0.5, pbs=False, ema=True, progress=False)
        states[device] = event.state.ema
        if device == "cuda":
            assert all(value.device.type == "cpu" for value in event.state.ema.values())
            assert {key: value.data_ptr() for key, value in event.state.ema.items()} == first
    assert states["cpu"].keys() == states["cuda"].keys()
    for key, value in states["cuda"].items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, states["cpu"][key], msg=key)
