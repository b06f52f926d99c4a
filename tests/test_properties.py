"""Property tests over shapes, alphas and logit scales (hypothesis)."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given

from label_relaxation import LabelRelaxationLoss, label_relaxation_loss
from tests.reference import expected_gradient, loss_scale, projected_kl

shapes = st.tuples(
    st.lists(st.integers(1, 4), min_size=0, max_size=3),  # leading dimensions
    st.integers(2, 40),  # classes
)
alphas = st.floats(1e-4, 0.95)
scales = st.sampled_from([1e-2, 1.0, 5.0, 30.0, 300.0])
implementations = st.sampled_from(["fused", "reference"])


def make(
    shape: tuple[list[int], int], scale: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    lead, classes = shape
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*lead, classes, generator=generator, dtype=torch.float64) * scale
    target = torch.randint(0, classes, tuple(lead), generator=generator)
    return logits, target


def grad_of(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    implementation: str,
    reduction: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.clone().requires_grad_()
    loss = label_relaxation_loss(
        leaf, target, alpha, reduction=reduction, implementation=implementation
    )  # type: ignore[arg-type]
    loss.sum().backward()
    assert leaf.grad is not None
    return loss.detach(), leaf.grad


@given(shapes, alphas, scales, st.integers(0, 2**31), implementations)
def test_nonnegative_zero_iff_inside_gradient_is_p_minus_q(
    shape, alpha, scale, seed, implementation
) -> None:  # type: ignore[no-untyped-def]
    logits, target = make(shape, scale, seed)
    loss, grad = grad_of(logits, target, alpha, implementation)
    flat_logits, flat_target = logits.reshape(-1, shape[1]), target.reshape(-1)
    ref = projected_kl(flat_logits, flat_target, alpha).reshape(loss.shape)
    assert bool((loss >= 0).all())
    inside = torch.softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1) >= 1 - alpha
    assert bool(((loss == 0) == inside).all())
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    g_ref = expected_gradient(flat_logits, flat_target, alpha).reshape(grad.shape)
    torch.testing.assert_close(grad, g_ref, rtol=1e-9, atol=1e-12)
    assert bool((grad[inside] == 0).all())


@given(
    shapes,
    alphas,
    scales,
    st.integers(0, 2**31),
    implementations,
    st.sampled_from(["none", "mean", "sum"]),
)
def test_one_hot_equals_index_and_nd_equals_flat(
    shape, alpha, scale, seed, implementation, reduction
) -> None:  # type: ignore[no-untyped-def]
    logits, target = make(shape, scale, seed)
    one_hot = torch.nn.functional.one_hot(target, shape[1]).double()
    loss_index, grad_index = grad_of(logits, target, alpha, implementation, reduction)
    loss_one_hot, grad_one_hot = grad_of(logits, one_hot, alpha, implementation, reduction)
    torch.testing.assert_close(loss_one_hot, loss_index, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_one_hot, grad_index, rtol=1e-12, atol=1e-14)
    flat_loss, flat_grad = grad_of(
        logits.reshape(-1, shape[1]), target.reshape(-1), alpha, implementation, reduction
    )
    torch.testing.assert_close(
        flat_loss.reshape(loss_index.shape), loss_index, rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        flat_grad.reshape(grad_index.shape), grad_index, rtol=1e-12, atol=1e-14
    )


@given(shapes, alphas, scales, st.integers(0, 2**31), st.sampled_from(["none", "mean", "sum"]))
def test_module_equals_functional_and_paths_agree(shape, alpha, scale, seed, reduction) -> None:  # type: ignore[no-untyped-def]
    logits, target = make(shape, scale, seed)
    criterion = LabelRelaxationLoss(alpha, reduction=reduction)
    # Like with like: with a gradient the module runs the function's very kernel.
    module_loss = criterion(logits.clone().requires_grad_(), target).detach()
    fused, _ = grad_of(logits, target, alpha, "fused", reduction)
    reference, _ = grad_of(logits, target, alpha, "reference", reduction)
    torch.testing.assert_close(module_loss, fused, rtol=1e-15, atol=0)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-14)
    # Without a gradient the kernels take a shorter route to the same value (log space).
    torch.testing.assert_close(criterion(logits, target), reference, rtol=1e-12, atol=1e-14)


@given(st.integers(2, 30), alphas, st.floats(10.0, 1e4), st.integers(0, 2**31), implementations)
def test_float32_stays_finite_at_large_scales(classes, alpha, scale, seed, implementation) -> None:  # type: ignore[no-untyped-def]
    logits, target = make(([8], classes), scale, seed)
    loss, grad = grad_of(logits.float(), target, alpha, implementation)
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
    ref = projected_kl(logits.float(), target, alpha)
    # Same bound as test_values: 1e-6 of the two closed-form terms' magnitude.
    assert bool(
        ((loss.double() - ref).abs() <= 1e-6 * loss_scale(logits.float(), target, alpha)).all()
    )
