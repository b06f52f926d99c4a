"""The package against frozen references of the paper's original code (see legacy/README.md).

TensorFlow is imported inside a module-scoped fixture, so only these tests pay for it.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch

from label_relaxation import label_relaxation_loss, soft_label_relaxation_loss
from legacy import pytorch_2022
from tests.reference import expected_gradient, projected_kl

ALPHAS = (0.01, 0.05, 0.1, 0.3, 0.6)
CLASSES = (2, 10, 100, 1000)


@pytest.fixture(scope="module")
def tf() -> ModuleType:
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def tf2_2020(tf: ModuleType) -> ModuleType:
    from legacy import tf2_2020

    return tf2_2020


def case(classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, classes, generator=generator, dtype=torch.float64)
    target = torch.randint(0, classes, (64,), generator=generator)
    target[0] = classes - 1  # every batch holds the highest class (reference (2) needs it)
    return logits, target


def ours(
    logits: torch.Tensor, target: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.clone().requires_grad_()
    value = label_relaxation_loss(leaf, target, alpha)
    value.backward()
    assert leaf.grad is not None
    return value.detach(), leaf.grad


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("classes", CLASSES)
def test_matches_tf2_2020(tf: ModuleType, tf2_2020: ModuleType, alpha: float, classes: int) -> None:
    logits, target = case(classes, seed=classes)
    value, grad = ours(logits, target, alpha)
    y_true = tf.one_hot(target.numpy(), classes, dtype=tf.float64)
    ref_value, ref_grad = tf2_2020.loss_and_logit_gradient(logits.numpy(), y_true, alpha)
    # The original's clip and +1e-7 perturb the result by about 1e-7 at moderate logits.
    np.testing.assert_allclose(value.numpy(), ref_value.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad.numpy(), ref_grad.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("classes", CLASSES)
def test_matches_pytorch_2022(alpha: float, classes: int) -> None:
    logits, target = case(classes, seed=classes + 1)
    value, grad = ours(logits, target, alpha)
    leaf = logits.clone().requires_grad_()
    ref_value = pytorch_2022.loss(leaf, target, alpha)
    ref_value.backward()
    assert leaf.grad is not None
    # The port's q_y is float32(1 - alpha) = 1 - alpha + delta: its q sums to 1 + delta, which
    # moves the loss by at most delta·(1 + |log(q_y / p_y)|) per row, and its gradient
    # (1 + delta)·p - q by delta·p off the target and delta·(p_y - 1) at the target.
    delta = abs(float(torch.tensor(1 - alpha, dtype=torch.float32)) - (1 - alpha))
    p = torch.softmax(logits, -1)
    p_y = p.gather(-1, target[:, None]).squeeze(-1)
    row_bound = delta * (1 + torch.log((1 - alpha) / p_y).abs())
    assert abs(float(value - ref_value.detach())) <= float(row_bound.mean()) + 1e-12
    one_hot = torch.nn.functional.one_hot(target, classes)
    grad_bound = delta * (p + one_hot) / len(target) + 1e-15
    assert bool(((grad - leaf.grad).abs() <= grad_bound).all())


def test_tf2_2020_saturates_where_ours_stays_exact(tf: ModuleType, tf2_2020: ModuleType) -> None:
    logits = torch.tensor([[-20.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # p_y ~ 7e-10 < 1e-7
    target = torch.tensor([0])
    y_true = tf.one_hot(target.numpy(), 4, dtype=tf.float64)
    ref_value, ref_grad = tf2_2020.loss_and_logit_gradient(logits.numpy(), y_true, 0.1)
    assert ref_value.numpy() == pytest.approx(14.18, abs=0.01)
    # Zero up to the rounding of the renormalisation (about 1e-10), against a true gradient of
    # order 1 at the target.
    assert np.abs(ref_grad.numpy()).max() < 1e-9
    value, grad = ours(logits, target, 0.1)
    torch.testing.assert_close(value, projected_kl(logits, target, 0.1)[0], rtol=1e-12, atol=0)
    assert value > 17
    torch.testing.assert_close(grad, expected_gradient(logits, target, 0.1), rtol=1e-10, atol=1e-14)
    assert grad[0, 0] < -0.8


def test_pytorch_2022_is_nan_when_float32_softmax_saturates() -> None:
    logits = torch.tensor([[0.0, 120.0, -5.0], [1.0, 0.0, 0.5]])
    target = torch.tensor([0, 2])
    assert torch.isnan(pytorch_2022.loss(logits, target, 0.1))
    value, grad = ours(logits, target, 0.1)
    assert bool(torch.isfinite(value)) and bool(torch.isfinite(grad).all())
    reference = projected_kl(logits, target, 0.1).mean()
    torch.testing.assert_close(value.double(), reference, rtol=1e-6, atol=0)


def test_pytorch_2022_fails_without_the_highest_class() -> None:
    logits = torch.randn(4, 10)
    target = torch.tensor([0, 1, 2, 3])  # classes 4..9 absent
    with pytest.raises(RuntimeError):
        pytorch_2022.loss(logits, target, 0.1)
    assert bool(torch.isfinite(label_relaxation_loss(logits, target, 0.1)))


def test_greater_than_point_one_rule_breaks_mixed_targets(
    tf: ModuleType, tf2_2020: ModuleType
) -> None:
    mixed = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64), -1)
    q_2020 = tf2_2020.credal_target(tf.constant(mixed.numpy()), tf.constant(p.numpy()), 0.1).numpy()
    q_2022 = pytorch_2022.credal_target(p, mixed, 0.1)
    assert q_2020.sum() > 1.5 and float(q_2022.sum()) > 1.5  # 2·(1 - alpha) plus the rest
    # Ours: the plain loss refuses the target; the soft loss projects onto a real distribution.
    with pytest.raises(ValueError, match="exactly one-hot"):
        label_relaxation_loss(p.log(), mixed)
    value = soft_label_relaxation_loss(p.log(), mixed, 0.1)
    assert bool(torch.isfinite(value)) and value > 0
