"""weight, ignore_index and reductions follow nn.CrossEntropyLoss.

At alpha = 1e-7 the loss is cross-entropy up to alpha·log(alpha/r) + alpha·log p_y, terms of
order 1e-6, so both must agree to that, in value and gradient, for every reduction.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from label_relaxation import label_relaxation_loss

ALPHA = 1e-7
# |loss - CE| <= alpha·(|log alpha| + |log r| + |log p_y|) + float32 rounding: about 4e-6 here.
ATOL = 2e-5


def both(
    logits: torch.Tensor, target: torch.Tensor, implementation: str, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ours_leaf = logits.detach().clone().requires_grad_()
    ce_leaf = logits.detach().clone().requires_grad_()
    ours = label_relaxation_loss(ours_leaf, target, ALPHA, implementation=implementation, **kwargs)  # type: ignore[arg-type]
    # F.cross_entropy wants the class dimension second.
    ce = F.cross_entropy(
        ce_leaf.movedim(-1, 1),
        target if not target.is_floating_point() else target.movedim(-1, 1),
        **kwargs,
    )  # type: ignore[arg-type]
    ours.sum().backward()
    ce.sum().backward()
    assert ours_leaf.grad is not None and ce_leaf.grad is not None
    return ours, ce.movedim(1, -1) if ce.dim() > 1 else ce, ours_leaf.grad, ce_leaf.grad


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_weight_and_ignore_index_match_cross_entropy(
    implementation: str, reduction: str, use_weight: bool, ignore_index: int
) -> None:
    logits = torch.randn(4, 7, 10)
    target = torch.randint(0, 10, (4, 7))
    target[0, :3] = ignore_index
    target[2, 5] = ignore_index
    weight = torch.rand(10) + 0.1 if use_weight else None
    ours, ce, g_ours, g_ce = both(
        logits,
        target,
        implementation,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    torch.testing.assert_close(ours, ce, rtol=0, atol=ATOL * (1 if reduction != "sum" else 28))
    torch.testing.assert_close(g_ours, g_ce, rtol=0, atol=ATOL)
    ignored = target == ignore_index
    assert bool((g_ours[ignored] == 0).all())
    if reduction == "none":
        assert bool((ours[ignored] == 0).all())


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_one_hot_target_matches_cross_entropy_probabilities(
    implementation: str, reduction: str
) -> None:
    logits = torch.randn(12, 6)
    target = torch.nn.functional.one_hot(torch.randint(0, 6, (12,)), 6).float()
    weight = torch.rand(6) + 0.1
    ours, ce, g_ours, g_ce = both(
        logits, target, implementation, weight=weight, reduction=reduction
    )
    torch.testing.assert_close(ours, ce, rtol=0, atol=ATOL * 12)
    torch.testing.assert_close(g_ours, g_ce, rtol=0, atol=ATOL)


def test_all_ignored_batch_gives_zero_not_nan(implementation: str) -> None:
    logits = torch.randn(5, 4, requires_grad=True)
    target = torch.full((5,), -100)
    loss = label_relaxation_loss(logits, target, 0.1, implementation=implementation)  # type: ignore[arg-type]
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and bool((logits.grad == 0).all())
    # Cross-entropy returns 0/0 here; the difference is deliberate and documented.
    assert torch.isnan(F.cross_entropy(logits, target))


def test_ignored_rows_with_garbage_logits_are_exactly_zero(implementation: str) -> None:
    logits = torch.randn(4, 5)
    logits[1] = torch.tensor([3e38, -3e38, 0.0, 1.0, -1.0])
    logits[2] = float("-inf")
    target = torch.tensor([0, -100, -100, 3])
    leaf = logits.clone().requires_grad_()
    loss = label_relaxation_loss(leaf, target, 0.1, reduction="none", implementation=implementation)  # type: ignore[arg-type]
    assert loss[1] == 0 and loss[2] == 0
    loss.sum().backward()
    assert leaf.grad is not None and bool((leaf.grad[1:3] == 0).all())


def test_integer_target_dtypes(implementation: str) -> None:
    logits = torch.randn(8, 5)
    target = torch.randint(0, 5, (8,))
    expected = label_relaxation_loss(logits, target, 0.3, implementation=implementation)  # type: ignore[arg-type]
    for dtype in (torch.int32, torch.int16, torch.uint8):
        got = label_relaxation_loss(logits, target.to(dtype), 0.3, implementation=implementation)  # type: ignore[arg-type]
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
