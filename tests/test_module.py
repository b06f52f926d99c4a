"""LabelRelaxationLoss stores its arguments and delegates to the function."""

from __future__ import annotations

import copy

import pytest
import torch

from label_relaxation import LabelRelaxationLoss, label_relaxation_loss


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_module_equals_functional(implementation: str, reduction: str) -> None:
    weight = torch.rand(9) + 0.5
    criterion = LabelRelaxationLoss(
        0.15,
        weight=weight,
        ignore_index=2,
        reduction=reduction,
        implementation=implementation,  # type: ignore[arg-type]
    )
    logits = torch.randn(3, 4, 9)
    target = torch.randint(0, 9, (3, 4))
    expected = label_relaxation_loss(
        logits,
        target,
        0.15,
        weight=weight,
        ignore_index=2,
        reduction=reduction,
        implementation=implementation,  # type: ignore[arg-type]
    )
    torch.testing.assert_close(criterion(logits, target), expected, rtol=0, atol=0)


def test_alpha_schedule_updates_buffer_in_place() -> None:
    criterion = LabelRelaxationLoss(0.1)
    buffer = criterion.alpha_buffer
    logits, target = torch.randn(6, 5) * 3, torch.randint(0, 5, (6,))
    for alpha in (0.2, 0.05, 0.3):
        criterion.alpha = alpha
        assert criterion.alpha == alpha and criterion.alpha_buffer is buffer
        assert criterion.alpha_buffer.item() == alpha
        torch.testing.assert_close(
            criterion(logits, target), label_relaxation_loss(logits, target, alpha)
        )
    with pytest.raises(ValueError, match="open interval"):
        criterion.alpha = 1.0


def test_weight_is_a_buffer_in_state_dict_and_follows_to() -> None:
    weight = torch.rand(4)
    criterion = LabelRelaxationLoss(weight=weight)
    assert "weight" in dict(criterion.named_buffers())
    assert set(criterion.state_dict()) == {"weight"}
    converted = criterion.to(torch.float64)
    assert converted.weight is not None and converted.weight.dtype == torch.float64
    # alpha keeps float64 through dtype casts, so 0.1 stays 0.1 even after .half().
    criterion.half()
    assert criterion.alpha_buffer.dtype == torch.float64 and criterion.alpha_buffer.item() == 0.1
    other = LabelRelaxationLoss(weight=torch.zeros(4))
    other.load_state_dict(LabelRelaxationLoss(weight=weight).state_dict())
    assert other.weight is not None and torch.equal(other.weight, weight)


def test_no_weight_state_dict_is_empty_and_copies_work() -> None:
    criterion = LabelRelaxationLoss(0.3, reduction="sum")
    assert criterion.state_dict() == {}
    clone = copy.deepcopy(criterion)
    clone.alpha = 0.2
    assert criterion.alpha == 0.3 and clone.alpha == 0.2


def test_repr_shows_alpha_and_reduction() -> None:
    assert (
        repr(LabelRelaxationLoss(0.25, reduction="sum"))
        == "LabelRelaxationLoss(alpha=0.25, reduction='sum')"
    )
    assert "ignore_index=0" in repr(LabelRelaxationLoss(ignore_index=0))
