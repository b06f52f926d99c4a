"""CUDA: both implementations against the float64 reference, no host syncs, Inductor on GPU.

Skipped where no GPU is visible (the development machine and CI). `bench/cuda.sh` runs this
file on a lent GPU machine together with the GPU benchmark table.
"""

from __future__ import annotations

import pytest
import torch

from label_relaxation import label_relaxation_loss, mixup_label_relaxation_loss
from tests.reference import expected_gradient, projected_kl
from tests.test_values import assert_matches_reference, loss_and_grad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = "cuda"


@pytest.mark.parametrize("num_classes", [7, 1000, 32003])
@pytest.mark.parametrize("scale", [1.0, 10.0, 1e3])
def test_float32_on_cuda_matches_float64_reference(
    implementation: str, num_classes: int, scale: float
) -> None:
    logits = torch.randn(64, num_classes) * scale
    target = torch.randint(0, num_classes, (64,))
    for alpha in (1e-4, 0.1, 0.5):
        loss, grad = loss_and_grad(logits.to(CUDA), target.to(CUDA), alpha, implementation)
        assert loss.device.type == CUDA and grad.device.type == CUDA
        # Same tolerances as on the CPU (tests/test_values.py): CUDA's exp2f is accurate to
        # 2 ulp, well inside RTOL32.
        assert_matches_reference(logits, target, alpha, implementation, loss.cpu(), grad.cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cuda(implementation: str, dtype: torch.dtype) -> None:
    logits = (torch.randn(128, 257) * 3).to(dtype)
    target = torch.randint(0, 257, (128,))
    loss, grad = loss_and_grad(logits.to(CUDA), target.to(CUDA), 0.1, implementation)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref = projected_kl(logits.float(), target, 0.1)
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-6)
    eps = torch.finfo(dtype).eps
    g_ref = expected_gradient(logits.float(), target, 0.1)
    torch.testing.assert_close(grad.cpu().double(), g_ref, rtol=eps, atol=eps * 1e-2)


def test_fused_path_makes_no_host_sync_with_validate_false() -> None:
    logits = torch.randn(4, 16, 1000, device=CUDA, requires_grad=True)
    target = torch.randint(0, 1000, (4, 16), device=CUDA)
    target[0, :3] = -100
    weight = torch.rand(1000, device=CUDA) + 0.5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = label_relaxation_loss(
            logits, target, 0.1, weight=weight, implementation="fused", validate=False
        )
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.grad is not None
    expected = label_relaxation_loss(
        logits.detach().cpu(), target.cpu(), 0.1, weight=weight.cpu(), implementation="reference"
    )
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-5, atol=1e-7)


def test_inplace_on_cuda_equals_the_separate_buffer() -> None:
    base = torch.randn(32, 5000, device=CUDA)
    target = torch.randint(0, 5000, (32,), device=CUDA)
    leaf = base.clone().requires_grad_()
    label_relaxation_loss(leaf, target, 0.1).backward()
    h = base.clone().requires_grad_()
    logits = h * 1.0
    label_relaxation_loss(logits, target, 0.1, inplace=True).backward()
    assert h.grad is not None and leaf.grad is not None
    torch.testing.assert_close(h.grad, leaf.grad, rtol=0, atol=0)


def test_mixup_on_cuda_matches_the_pure_formulation() -> None:
    logits = torch.randn(64, 100, device=CUDA) * 4
    a = torch.randint(0, 100, (64,), device=CUDA)
    b = torch.randint(0, 100, (64,), device=CUDA)
    lam = torch.rand(64, device=CUDA)
    results = {}
    for implementation in ("fused", "reference"):
        leaf = logits.clone().requires_grad_()
        loss = mixup_label_relaxation_loss(
            leaf, a, b, lam, 0.1, reduction="sum", implementation=implementation
        )
        loss.backward()
        results[implementation] = (loss.detach(), leaf.grad)
    torch.testing.assert_close(*[results[k][0] for k in results], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(*[results[k][1] for k in results], rtol=2e-5, atol=1e-7)


def test_autocast_float16_on_cuda(implementation: str) -> None:
    linear = torch.nn.Linear(32, 50).to(CUDA)
    x = torch.randn(64, 32, device=CUDA)
    target = torch.randint(0, 50, (64,), device=CUDA)
    with torch.autocast(CUDA, dtype=torch.float16):
        logits = linear(x)
        assert logits.dtype == torch.float16
        loss = label_relaxation_loss(logits, target, 0.1, implementation=implementation)
    assert loss.dtype == torch.float32
    loss.backward()
    assert linear.weight.grad is not None and bool(torch.isfinite(linear.weight.grad).all())
    ref = projected_kl(logits.detach().float().cpu(), target.cpu(), 0.1).mean()
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.inductor
def test_inductor_on_cuda_matches_eager() -> None:
    torch._dynamo.reset()
    logits = torch.randn(2, 8, 3001, device=CUDA) * 3
    target = torch.randint(0, 3001, (2, 8), device=CUDA)
    target[1, 0] = -100
    weight = torch.rand(3001, device=CUDA) + 0.5

    def fn(z: torch.Tensor) -> torch.Tensor:
        return label_relaxation_loss(z, target, 0.1, weight=weight)

    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f in (compiled, fn):
        leaf = logits.clone().requires_grad_()
        loss = f(leaf)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_loss_on_cuda_matches_the_unfused_loss(reduction: str) -> None:
    from label_relaxation import linear_label_relaxation_loss

    x = torch.randn(300, 64, device=CUDA, requires_grad=True)
    weight = torch.randn(5003, 64, device=CUDA, requires_grad=True)
    target = torch.randint(0, 5003, (300,), device=CUDA)
    grad_out = torch.rand(300, device=CUDA) if reduction == "none" else torch.ones((), device=CUDA)
    fused = linear_label_relaxation_loss(x, weight, target, 0.1, reduction=reduction, chunk_size=64)
    fused_grads = torch.autograd.grad(fused, (x, weight), grad_out)
    unfused = label_relaxation_loss(
        torch.nn.functional.linear(x.double(), weight.double()), target, 0.1, reduction=reduction
    )
    unfused_grads = torch.autograd.grad(unfused, (x, weight), grad_out.double())
    torch.testing.assert_close(fused.double(), unfused, rtol=1e-5, atol=1e-6)
    for ours, expected in zip(fused_grads, unfused_grads, strict=True):
        scale = expected.abs().max()
        assert (ours.double() - expected).abs().max() <= 1e-5 * scale
