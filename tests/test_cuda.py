"""What runs only on CUDA: the bf16 tensor-core H = XᵀX of calibration and PBS with TF32 products, each against a
float64 computation of the same formula. Skipped without a GPU; run on the device (eval/gpu_trainer_runs.sh)."""

import pytest
import torch

from exert_ds.calibration import gram
from exert_ds.foresight import row_mask
from exert_ds.pbs import float32_matmul_precision, partial_brain_surgeon_with_errors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_of_half_precision_activations_is_float32_and_exact_products(dtype):
    x = (torch.randn(4096, 512, device="cuda") * torch.rand(512, device="cuda") * 3).to(dtype)
    h = gram(x)
    assert h.dtype == torch.float32
    want = x.double().T @ x.double()
    assert rel(gram(x.float()), want) < 1e-5  # the upcast path: float32 products and sums
    assert rel(h, want) < 1e-4  # tensor-core float32 accumulation: about 2.5e-5 measured on an H200


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
