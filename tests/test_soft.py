"""Soft and mixup targets: the water-filling closed form against a generic convex solver."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given
from scipy.optimize import minimize

from label_relaxation import (
    MixupLabelRelaxationLoss,
    SoftLabelRelaxationLoss,
    label_relaxation_loss,
    mixup_label_relaxation_loss,
    soft_label_relaxation_loss,
)


def solver_projection(p: np.ndarray, t: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """min KL(q || p) over {q in simplex, q >= (1-alpha) t}, by SLSQP (no closed form used)."""
    floor = (1 - alpha) * t
    start = floor + alpha / len(p)

    def objective(q: np.ndarray) -> float:
        q = np.maximum(q, 1e-300)
        return float(np.sum(q * (np.log(q) - np.log(p))))

    def gradient(q: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(q, 1e-300)) + 1 - np.log(p)

    result = minimize(
        objective,
        start,
        jac=gradient,
        method="SLSQP",
        bounds=[(f, 1.0) for f in floor],
        constraints=[
            {"type": "eq", "fun": lambda q: q.sum() - 1, "jac": lambda q: np.ones_like(q)}
        ],
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    # Status 8 ("positive directional derivative for linesearch") means SLSQP could not improve
    # further at this precision; the point is accepted when it is feasible.
    assert result.success or result.status == 8, result.message
    q = result.x
    assert abs(q.sum() - 1) < 1e-9 and bool((q >= floor - 1e-12).all())
    return q, float(result.fun)


def random_case(
    seed: int, classes: int, scale: float, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(classes, generator=generator, dtype=torch.float64) * scale
    if kind == "dirichlet":
        target = torch.distributions.Dirichlet(
            torch.full((classes,), 0.5, dtype=torch.float64)
        ).sample()
    elif kind == "sparse":
        target = torch.zeros(classes, dtype=torch.float64)
        picks = torch.randperm(classes, generator=generator)[:3]
        target[picks] = torch.rand(3, generator=generator, dtype=torch.float64)
        target /= target.sum()
    else:  # label-smoothed
        target = torch.full((classes,), 0.1 / classes, dtype=torch.float64)
        target[int(torch.randint(0, classes, (1,), generator=generator))] += 0.9
    return logits, target


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", ["dirichlet", "sparse", "smoothed"])
def test_closed_form_matches_convex_solver(seed: int, kind: str) -> None:
    torch.manual_seed(seed)
    classes = [3, 5, 10, 40][seed % 4]
    alpha = [0.05, 0.1, 0.3, 0.6][seed % 3]
    logits, target = random_case(seed, classes, [1.0, 3.0, 6.0][seed % 3], kind)
    leaf = logits.clone().requires_grad_()
    loss = soft_label_relaxation_loss(leaf[None], target[None], alpha, reduction="sum")
    loss.backward()
    p = torch.softmax(logits, -1).numpy()
    q, value = solver_projection(p, target.numpy(), alpha)
    # SLSQP stops at ftol 1e-15 on the objective; its minimiser is accurate to ~1e-7.
    assert abs(loss.item() - value) <= 1e-6 * max(1.0, abs(value))
    assert leaf.grad is not None
    np.testing.assert_allclose(leaf.grad.numpy(), p - q, atol=2e-6)


@given(
    st.integers(2, 12),
    st.floats(0.01, 0.9),
    st.sampled_from([0.5, 2.0, 8.0]),
    st.integers(0, 2**31),
)
def test_gradient_is_p_minus_q_of_the_closed_form(
    classes: int, alpha: float, scale: float, seed: int
) -> None:
    logits, target = random_case(seed, classes, scale, "dirichlet")
    p = torch.softmax(logits, -1)
    # q from the KKT form, tau found by bisection (independent of the sort-based code).
    floor = (1 - alpha) * target
    lo, hi = 0.0, float((1 / p).max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(torch.maximum(floor, mid * p).sum()) < 1 else (lo, mid)
    q = torch.maximum(floor, hi * p)
    leaf = logits.clone().requires_grad_()
    loss = soft_label_relaxation_loss(leaf, target, alpha, reduction="sum")
    loss.backward()
    expected = torch.where(q > 0, q * (q.log() - p.log()), 0).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(leaf.grad, p - q, rtol=1e-8, atol=1e-10)
    assert loss >= 0


def test_finite_differences() -> None:
    logits = (torch.randn(4, 6, dtype=torch.float64) * 2).requires_grad_()
    target = torch.softmax(torch.randn(4, 6, dtype=torch.float64) * 3, -1)
    assert torch.autograd.gradcheck(
        lambda z: soft_label_relaxation_loss(z, target, 0.2, reduction="none"), (logits,)
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_one_hot_equals_plain_loss(reduction: str) -> None:
    logits = torch.randn(3, 7, 9, dtype=torch.float64) * 4
    target = torch.randint(0, 9, (3, 7))
    one_hot = torch.nn.functional.one_hot(target, 9).double()
    weight = torch.rand(9, dtype=torch.float64) + 0.5
    for w in (None, weight):
        soft = soft_label_relaxation_loss(logits, one_hot, 0.15, weight=w, reduction=reduction)
        plain = label_relaxation_loss(logits, one_hot, 0.15, weight=w, reduction=reduction)
        torch.testing.assert_close(soft, plain, rtol=1e-12, atol=1e-14)


def test_mixup_limits() -> None:
    logits = torch.randn(16, 10, dtype=torch.float64) * 3
    a = torch.randint(0, 10, (16,))
    b = torch.randint(0, 10, (16,))
    plain_a = label_relaxation_loss(logits, a, 0.1, reduction="none")
    plain_b = label_relaxation_loss(logits, b, 0.1, reduction="none")
    torch.testing.assert_close(
        mixup_label_relaxation_loss(logits, a, b, 1.0, 0.1, reduction="none"), plain_a
    )
    torch.testing.assert_close(
        mixup_label_relaxation_loss(logits, a, b, 0.0, 0.1, reduction="none"), plain_b
    )
    torch.testing.assert_close(
        mixup_label_relaxation_loss(logits, a, a, 0.37, 0.1, reduction="none"), plain_a
    )


def test_small_alpha_tends_to_soft_cross_entropy() -> None:
    logits = torch.randn(8, 6, dtype=torch.float64)
    target = torch.softmax(torch.randn(8, 6, dtype=torch.float64), -1)
    alpha = 1e-9
    ours = soft_label_relaxation_loss(logits, target, alpha, reduction="none")
    # KL(t || p) = CE(t, p) - H(t): label relaxation minus KL tends to 0 with alpha.
    kl = (target * (target.log() - torch.log_softmax(logits, -1))).sum(-1)
    torch.testing.assert_close(ours, kl, rtol=0, atol=1e-7)


@pytest.mark.parametrize("lam", [0.3, "tensor"])
def test_mixup_equals_soft_on_mixed_targets(lam: object) -> None:
    logits = torch.randn(5, 8, dtype=torch.float64) * 2
    a, b = torch.randint(0, 8, (5,)), torch.randint(0, 8, (5,))
    lam_value = torch.rand(5, dtype=torch.float64) if lam == "tensor" else 0.3
    lam_column = lam_value[:, None] if isinstance(lam_value, torch.Tensor) else lam_value
    one_hot_a = torch.nn.functional.one_hot(a, 8).double()
    one_hot_b = torch.nn.functional.one_hot(b, 8).double()
    mixed = lam_column * one_hot_a + (1 - lam_column) * one_hot_b
    expected = soft_label_relaxation_loss(logits, mixed.double(), 0.2, reduction="none")
    got = mixup_label_relaxation_loss(logits, a, b, lam_value, 0.2, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)
    module = MixupLabelRelaxationLoss(0.2, reduction="none")
    torch.testing.assert_close(module(logits, a, b, lam_value), expected, rtol=1e-13, atol=1e-15)


def test_zero_inside_and_finite_everywhere() -> None:
    target = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    inside = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.4, 0.9]])  # p_k >= 0.9 t_k in every class
    leaf = inside.clone().requires_grad_()
    loss = soft_label_relaxation_loss(leaf, target, 0.1, reduction="none")
    loss.sum().backward()
    assert bool((loss == 0).all()) and leaf.grad is not None and bool((leaf.grad == 0).all())
    extreme = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 0.0, 1e4]]).requires_grad_()
    loss = soft_label_relaxation_loss(extreme, target, 0.1, reduction="none")
    loss.sum().backward()
    assert (
        bool(torch.isfinite(loss).all())
        and extreme.grad is not None
        and bool(torch.isfinite(extreme.grad).all())
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype: torch.dtype) -> None:
    logits = (torch.randn(6, 5) * 2).to(dtype).requires_grad_()
    target = torch.softmax(torch.randn(6, 5), -1)
    loss = soft_label_relaxation_loss(logits, target, 0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad is not None and logits.grad.dtype == dtype
    reference = soft_label_relaxation_loss(logits.detach().double(), target.double(), 0.1)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)


def test_module_equals_functional_and_weight_generalisation() -> None:
    logits = torch.randn(4, 5, dtype=torch.float64)
    target = torch.softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    weight = torch.rand(5, dtype=torch.float64)
    module = SoftLabelRelaxationLoss(0.2, weight=weight, reduction="none")
    rows = soft_label_relaxation_loss(logits, target, 0.2, reduction="none")
    torch.testing.assert_close(module(logits, target), rows * (target * weight).sum(-1))
    module.alpha = 0.3
    torch.testing.assert_close(
        module(logits, target),
        soft_label_relaxation_loss(logits, target, 0.3, weight=weight, reduction="none"),
    )


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        (torch.tensor([[0.5, 0.6, -0.1]]), "entries >= 0 that sum to 1"),
        (torch.tensor([[0.5, 0.4, 0.0]]), "entries >= 0 that sum to 1"),
        (torch.tensor([[0.5, 0.5]]), r"target must have the logits' shape \(1, 3\)"),
    ],
)
def test_bad_soft_targets(target: torch.Tensor, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        soft_label_relaxation_loss(torch.randn(1, 3), target)


def test_bad_mixup_arguments() -> None:
    logits = torch.randn(2, 3)
    a, b = torch.tensor([0, 1]), torch.tensor([2, 0])
    with pytest.raises(ValueError, match=r"lam must be a number or tensor in \[0, 1\], got 1.5"):
        mixup_label_relaxation_loss(logits, a, b, 1.5)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        mixup_label_relaxation_loss(logits, a, b, torch.tensor([0.5, -0.2]))
    with pytest.raises(ValueError, match=r"target_b must have shape logits.shape\[:-1\] = \(2,\)"):
        mixup_label_relaxation_loss(logits, a, torch.tensor([0]), 0.5)
    with pytest.raises(
        IndexError,
        match=r"Target 3 is out of bounds: target_b must hold class indices in \[0, 3\)$",
    ):
        mixup_label_relaxation_loss(logits, a, torch.tensor([3, 0]), 0.5)
    with pytest.raises(ValueError, match=r"lam must be a float or a tensor broadcastable"):
        mixup_label_relaxation_loss(logits, a, b, torch.rand(3))


def test_compiled_and_vmapped() -> None:
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.func import grad, vmap

    logits = torch.randn(6, 7) * 2
    target = torch.softmax(torch.randn(6, 7) * 2, -1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(soft_label_relaxation_loss, fullgraph=True, backend=counter)
    for alpha in (0.1, 0.2, 0.3):
        a = torch.tensor(alpha)
        torch.testing.assert_close(
            compiled(logits, target, a),
            soft_label_relaxation_loss(logits, target, alpha),
            rtol=1e-6,
            atol=1e-7,
        )
    assert counter.frame_count == 1
    per_sample = vmap(grad(lambda z, t: soft_label_relaxation_loss(z, t, 0.2)))(logits, target)
    for i in range(6):
        leaf = logits[i].clone().requires_grad_()
        soft_label_relaxation_loss(leaf, target[i], 0.2).backward()
        torch.testing.assert_close(per_sample[i], leaf.grad)


@pytest.mark.inductor
def test_inductor_mixup() -> None:
    torch._dynamo.reset()
    criterion = MixupLabelRelaxationLoss(0.1)
    compiled = torch.compile(criterion, fullgraph=True)
    logits = torch.randn(16, 10) * 2
    a, b = torch.randint(0, 10, (16,)), torch.randint(0, 10, (16,))
    lam = torch.rand(16)
    torch.testing.assert_close(
        compiled(logits, a, b, lam), criterion(logits, a, b, lam), rtol=2e-6, atol=1e-7
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
def test_fused_mixup_matches_the_general_formulation(reduction: str, scale: float) -> None:
    generator = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(64, 12, generator=generator, dtype=torch.float64) * scale
    a = torch.randint(0, 12, (64,), generator=generator)
    b = torch.randint(0, 12, (64,), generator=generator)
    b[:8] = a[:8]  # same class: a one-hot target
    lam = torch.rand(64, generator=generator, dtype=torch.float64)
    lam[8:12] = 0.0
    lam[12:16] = 1.0
    weight = torch.rand(12, generator=generator, dtype=torch.float64) + 0.5
    results = {}
    for implementation in ("fused", "reference"):
        leaf = logits.clone().requires_grad_()
        loss = mixup_label_relaxation_loss(
            leaf, a, b, lam, 0.15, weight=weight, reduction=reduction, implementation=implementation
        )
        loss.sum().backward()
        results[implementation] = (loss.detach(), leaf.grad)
    torch.testing.assert_close(results["fused"][0], results["reference"][0], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(results["fused"][1], results["reference"][1], rtol=1e-9, atol=1e-13)


def test_fused_mixup_float32_and_bfloat16() -> None:
    logits = torch.randn(256, 1000) * 4
    a, b = torch.randint(0, 1000, (256,)), torch.randint(0, 1000, (256,))
    lam = torch.rand(256)
    reference = mixup_label_relaxation_loss(
        logits.double(), a, b, lam.double(), 0.1, reduction="none"
    )
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        leaf = logits.to(dtype).detach().clone().requires_grad_()
        loss = mixup_label_relaxation_loss(leaf, a, b, lam, 0.1, reduction="none")
        loss.sum().backward()
        assert loss.dtype == torch.float32 and leaf.grad is not None and leaf.grad.dtype == dtype
        exact = mixup_label_relaxation_loss(
            leaf.detach().double(), a, b, lam.double(), 0.1, reduction="none"
        )
        torch.testing.assert_close(loss.double(), exact, rtol=rtol, atol=1e-6)
    assert bool(torch.isfinite(reference).all())


def test_soft_module_alpha_schedule_compiles_once() -> None:
    """Recompilation is decided by Dynamo's guards, the same for every backend."""
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    criterion = SoftLabelRelaxationLoss(0.1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(criterion, fullgraph=True, backend=counter)
    logits = torch.randn(32, 9) * 2
    target = torch.softmax(torch.randn(32, 9) * 2, -1)
    for alpha in (0.1, 0.05, 0.2, 0.3, 0.01, 0.4):
        criterion.alpha = alpha
        expected = soft_label_relaxation_loss(logits, target, alpha)
        torch.testing.assert_close(compiled(logits, target), expected, rtol=1e-6, atol=1e-7)
    # One backend call in all: no alpha recompiles, and the first compile is not restarted
    # (a 0-d float64 input buffer would make Dynamo restart it, seen as a second call).
    assert counter.frame_count == 1


@pytest.mark.inductor
def test_inductor_soft_module() -> None:
    torch._dynamo.reset()
    criterion = SoftLabelRelaxationLoss(0.1)
    compiled = torch.compile(criterion, fullgraph=True)
    logits = torch.randn(32, 9) * 2
    target = torch.softmax(torch.randn(32, 9) * 2, -1)
    for alpha in (0.1, 0.3):
        criterion.alpha = alpha
        leaf_c = logits.clone().requires_grad_()
        leaf_e = logits.clone().requires_grad_()
        loss_c = compiled(leaf_c, target)
        loss_e = criterion(leaf_e, target)
        loss_c.backward()
        loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(leaf_c.grad, leaf_e.grad, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_target_sum_tolerance_is_1e_5(dtype: torch.dtype) -> None:
    """The documented rule: a row may miss a sum of 1 by at most 1e-5 (float32 and float64)."""
    logits = torch.randn(1, 2, dtype=dtype)
    accepted = torch.tensor([[0.5, 0.5 + 5e-6]], dtype=dtype)
    rejected = torch.tensor([[0.5, 0.5 + 5e-5]], dtype=dtype)
    assert torch.isfinite(soft_label_relaxation_loss(logits, accepted, 0.1))
    with pytest.raises(ValueError, match=r"sum to 1 \(within 1\.0e-05\)"):
        soft_label_relaxation_loss(logits, rejected, 0.1)


def test_mixup_checks_a_tensor_alpha() -> None:
    logits = torch.randn(4, 5)
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 0, 4])
    alpha = torch.tensor([0.1, 0.0, 0.2, 0.1])
    with pytest.raises(ValueError, match=r"alpha must lie in the open interval \(0, 1\)"):
        mixup_label_relaxation_loss(logits, a, b, 0.5, alpha)
    loss = mixup_label_relaxation_loss(logits, a, b, 0.5, alpha, reduction="none", validate=False)
    assert torch.isnan(loss[1]) and bool(torch.isfinite(loss[[0, 2, 3]]).all())


def test_unchecked_bad_row_gives_nan_loss_and_gradient() -> None:
    """A bad target row is NaN in loss and gradient (never a silent zero gradient)."""
    logits = torch.randn(3, 4, requires_grad=True)
    target = torch.softmax(torch.randn(3, 4), -1)
    target[1, 0] = -0.5
    loss = soft_label_relaxation_loss(logits, target, 0.1, reduction="none", validate=False)
    loss.sum().backward()
    assert logits.grad is not None
    assert torch.isnan(loss[1]) and bool(torch.isnan(logits.grad[1]).all())
    assert bool(torch.isfinite(loss[[0, 2]]).all())
    assert bool(torch.isfinite(logits.grad[[0, 2]]).all())
