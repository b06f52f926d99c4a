"""torch.func: per-sample gradients, functional_call, and every derivative transform."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

from label_relaxation import LabelRelaxationLoss, label_relaxation_loss
from tests.reference import closed_form, expected_gradient


def sample_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float | torch.Tensor = 0.2
) -> torch.Tensor:
    return label_relaxation_loss(logits, target, alpha)


@pytest.mark.parametrize(
    "kwargs", [{}, {"reduction": "sum"}, {"weight": True}, {"ignore_index": 1}]
)
def test_vmap_grad_matches_a_loop(kwargs: dict[str, object]) -> None:
    logits = torch.randn(5, 3, 7, dtype=torch.float64) * 3  # 5 samples of 3 positions
    target = torch.randint(0, 7, (5, 3))
    target[1, 0] = 1
    if kwargs.get("weight"):
        kwargs = {"weight": torch.rand(7, dtype=torch.float64) + 0.5}

    def f(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return label_relaxation_loss(z, y, 0.2, **kwargs)  # type: ignore[arg-type]

    batched = vmap(grad(f))(logits, target)
    for i in range(5):
        leaf = logits[i].clone().requires_grad_()
        f(leaf, target[i]).backward()
        torch.testing.assert_close(batched[i], leaf.grad, rtol=1e-12, atol=1e-14)


def test_vmap_per_sample_losses_with_per_sample_alpha_and_one_hot() -> None:
    logits = torch.randn(6, 9, dtype=torch.float64) * 2
    target = torch.randint(0, 9, (6,))
    one_hot = torch.nn.functional.one_hot(target, 9).double()
    alpha = torch.linspace(0.05, 0.5, 6, dtype=torch.float64)
    losses = vmap(sample_loss)(logits, one_hot, alpha)
    expected = label_relaxation_loss(logits, target, alpha, reduction="none")
    torch.testing.assert_close(losses, expected, rtol=1e-13, atol=1e-15)


def test_vmap_bad_target_gives_nan_not_a_crash() -> None:
    logits = torch.randn(3, 4)
    target = torch.tensor([0, 7, 2])
    losses = vmap(sample_loss)(logits, target)
    assert torch.isnan(losses[1]) and bool(torch.isfinite(losses[[0, 2]]).all())


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)
    ).double()


def test_per_sample_parameter_gradients_with_functional_call() -> None:
    model = make_model()
    criterion = LabelRelaxationLoss(0.1)
    params = {name: p.detach() for name, p in model.named_parameters()}
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))

    def loss_of(
        params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
    ) -> torch.Tensor:
        return criterion(functional_call(model, params, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, x, y)
    for i in range(8):
        model.zero_grad()
        criterion(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)


def test_compiled_vmap_grad_fullgraph() -> None:
    torch._dynamo.reset()
    logits = torch.randn(4, 6) * 2
    target = torch.randint(0, 6, (4,))
    eager = vmap(grad(sample_loss))(logits, target)
    compiled = torch.compile(vmap(grad(sample_loss)), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, target), eager, rtol=1e-6, atol=1e-7)


ALPHA = 0.3


@pytest.fixture
def point() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(3, 5, dtype=torch.float64) * 2
    target = torch.tensor([0, 2, 4])
    # Make sure rows are outside the credal set (the loss is smooth there).
    logits[torch.arange(3), target] -= 3
    return logits, target


def test_jacrev_and_jacfwd_match_p_minus_q(point: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, target = point

    def f(z: torch.Tensor) -> torch.Tensor:
        return label_relaxation_loss(z, target, ALPHA, reduction="none")

    expected = torch.zeros(3, 3, 5, dtype=torch.float64)
    rows = expected_gradient(logits, target, ALPHA)
    for i in range(3):
        expected[i, i] = rows[i]
    torch.testing.assert_close(jacrev(f)(logits), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(jacfwd(f)(logits), expected, rtol=1e-12, atol=1e-14)


def test_jvp_matches_directional_derivative(point: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, target = point
    tangent = torch.randn_like(logits)
    _, derivative = jvp(
        lambda z: label_relaxation_loss(z, target, ALPHA, reduction="sum"), (logits,), (tangent,)
    )
    expected = (expected_gradient(logits, target, ALPHA) * tangent).sum()
    torch.testing.assert_close(derivative, expected, rtol=1e-12, atol=1e-14)


def test_hessian_matches_float64_autograd_of_the_closed_form(
    point: tuple[torch.Tensor, torch.Tensor],
) -> None:
    logits, target = point
    ours = hessian(lambda z: label_relaxation_loss(z, target, ALPHA, reduction="sum"))(logits)
    reference = torch.autograd.functional.hessian(
        lambda z: closed_form(z, target, ALPHA).sum(), logits
    )
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    # Inside the credal set the loss is flat: Hessian rows of inside rows are zero.
    inside = logits.clone()
    inside[0] = torch.tensor([9.0, 0, 0, 0, 0])
    h = hessian(lambda z: label_relaxation_loss(z, target, ALPHA, reduction="sum"))(inside)
    assert bool((h[0] == 0).all())
