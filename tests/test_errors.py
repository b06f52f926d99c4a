"""Every bad input raises a clear exception naming the argument, expected and got."""

from __future__ import annotations

import pytest
import torch

from label_relaxation import LabelRelaxationLoss, label_relaxation_loss


def call(logits: object, target: object, alpha: object = 0.1, **kwargs: object) -> torch.Tensor:
    return label_relaxation_loss(logits, target, alpha, **kwargs)  # type: ignore[arg-type]


LOGITS = torch.randn(4, 5)
TARGET = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize(
    ("logits", "target", "kwargs", "error", "pattern"),
    [
        (
            LOGITS,
            torch.tensor([0, 1, 2]),
            {},
            ValueError,
            r"target of class indices must have shape .*\(4,\).*got shape \(3,\)",
        ),
        (LOGITS, torch.zeros(4, 6), {}, ValueError, r"one-hot.*shape \(4, 5\).*got shape \(4, 6\)"),
        (
            LOGITS,
            torch.tensor([True, False, True, True]),
            {},
            TypeError,
            r"target.*got dtype torch.bool",
        ),
        (LOGITS, [0, 1, 2, 3], {}, TypeError, r"target must be a torch.Tensor, got list"),
        (
            torch.randint(0, 3, (4, 5)),
            TARGET,
            {},
            TypeError,
            r"logits must be a floating tensor.*got dtype torch.int64",
        ),
        (
            torch.randn(4, 1),
            torch.zeros(4, dtype=torch.long),
            {},
            ValueError,
            r"at least 2 classes.*got shape \(4, 1\)",
        ),
        (torch.tensor(1.0), torch.tensor(0), {}, ValueError, r"0-d"),
        (LOGITS, TARGET, {"reduction": "avg"}, ValueError, r"reduction must be one of .*got 'avg'"),
        (
            LOGITS,
            TARGET,
            {"weight": torch.ones(4)},
            ValueError,
            r"weight must have shape \(C,\) = \(5,\).*got shape \(4,\)",
        ),
        (
            LOGITS,
            TARGET,
            {"weight": torch.ones(5, dtype=torch.long)},
            TypeError,
            r"weight must be a floating tensor",
        ),
        (LOGITS, TARGET, {"implementation": "fast"}, ValueError, r"implementation must be one of"),
    ],
)
def test_bad_arguments(
    logits: object, target: object, kwargs: dict[str, object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        call(logits, target, **kwargs)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_alpha_out_of_range(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"alpha must lie in the open interval \(0, 1\), got"):
        call(LOGITS, TARGET, alpha)
    with pytest.raises(ValueError, match=r"alpha must lie in the open interval \(0, 1\), got"):
        call(LOGITS, TARGET, torch.full((4,), alpha))
    with pytest.raises(ValueError, match=r"alpha must lie in the open interval \(0, 1\), got"):
        LabelRelaxationLoss(alpha)


def test_alpha_wrong_type_or_shape() -> None:
    with pytest.raises(TypeError, match="alpha must be a float or a floating tensor, got str"):
        call(LOGITS, TARGET, "0.1")
    with pytest.raises(TypeError, match="alpha must be a float or a floating tensor, got bool"):
        call(LOGITS, TARGET, True)
    with pytest.raises(TypeError, match=r"alpha must be a floating tensor, got dtype torch.int64"):
        call(LOGITS, TARGET, torch.tensor([0, 0, 0, 0]))
    with pytest.raises(
        ValueError, match=r"broadcastable to logits.shape\[:-1\] = \(4,\), got shape \(5,\)"
    ):
        call(LOGITS, TARGET, torch.full((5,), 0.1))
    with pytest.raises(ValueError, match=r"broadcastable .* got shape \(4, 2\)"):
        call(LOGITS, TARGET, torch.full((4, 2), 0.1))


@pytest.mark.parametrize("bad", [5, -1, 100, -101])
def test_index_out_of_range_is_index_error(implementation: str, bad: int) -> None:
    target = TARGET.clone()
    target[2] = bad
    with pytest.raises(
        IndexError, match=rf"Target {bad} is out of bounds.*\[0, 5\).*ignore_index=-100"
    ):
        call(LOGITS, target, implementation=implementation)


@pytest.mark.parametrize(
    "target",
    [
        torch.tensor([[0.9, 0.1, 0, 0, 0]] * 4),  # label-smoothed
        torch.tensor([[0.5, 0.5, 0, 0, 0]] * 4),  # mixup
        torch.tensor([[1.0, 1.0, 0, 0, 0]] * 4),  # two ones
        torch.tensor([[0.0, 0, 0, 0, 0]] * 4),  # empty row
        torch.tensor([[2.0, 0, 0, 0, 0]] * 4),
        torch.tensor([[1.0, -0.5, 0.5, 0, 0]] * 4),
    ],
)
def test_floating_target_must_be_exactly_one_hot(target: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"must be exactly one-hot.*soft_label_relaxation_loss"):
        call(LOGITS, target)


def test_module_weight_must_be_a_vector() -> None:
    with pytest.raises(ValueError, match=r"weight must be a floating tensor of shape \(C,\)"):
        LabelRelaxationLoss(weight=torch.ones(2, 3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        LabelRelaxationLoss(reduction="batchmean")  # type: ignore[arg-type]


def test_unchecked_bad_values_give_nan_not_a_wrong_number(implementation: str) -> None:
    """validate=False skips the host reads; bad positions then poison the result with NaN."""
    target = TARGET.clone()
    target[1] = 9
    loss = call(LOGITS, target, validate=False, reduction="none", implementation=implementation)
    assert torch.isnan(loss[1]) and bool(torch.isfinite(loss[[0, 2, 3]]).all())
    alpha = torch.tensor([0.1, 0.1, 1.5, 0.1])
    loss = call(
        LOGITS, TARGET, alpha, validate=False, reduction="none", implementation=implementation
    )
    assert torch.isnan(loss[2]) and bool(torch.isfinite(loss[[0, 1, 3]]).all())
    assert torch.isnan(call(LOGITS, target, validate=False, implementation=implementation))


def test_cross_entropy_layout_gets_a_hint() -> None:
    """Logits (N, C, d1, ...) with target (N, d1, ...): the layout of nn.CrossEntropyLoss."""
    logits = torch.randn(2, 5, 8, 8)
    target = torch.randint(0, 5, (2, 8, 8))
    with pytest.raises(
        ValueError,
        match=r"got shape \(2, 8, 8\)\. The shapes fit "
        r"nn\.CrossEntropyLoss's layout .* pass logits\.movedim\(1, -1\)",
    ):
        label_relaxation_loss(logits, target)
    label_relaxation_loss(logits.movedim(1, -1), target)  # the fix works
    with pytest.raises(ValueError, match=r"got shape \(3,\)$"):
        label_relaxation_loss(torch.randn(4, 5), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(
    "compiled", [None, "aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)]
)
def test_nan_and_infinite_logits(implementation: str, compiled: str | None) -> None:
    """NaN in, NaN out (loss and gradient of that row), as in cross-entropy; +inf is NaN too
    (inf - inf); -inf off the target is a masked class; -inf at the target gives an infinite
    loss with a finite gradient; ignored rows stay exactly 0 whatever they hold."""
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor(
        [
            [0.0, nan, 1.0, 2.0],
            [inf, 0.0, 1.0, 2.0],
            [0.0, -inf, 1.0, 2.0],
            [-inf, 0.0, 1.0, 2.0],
            [nan, nan, nan, nan],
            [1.0, 0.0, 0.0, 0.0],
        ]
    )
    target = torch.tensor([0, 0, 0, 0, -100, 0])

    def fn(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return label_relaxation_loss(z, y, 0.1, reduction="none", implementation=implementation)  # type: ignore[arg-type]

    if compiled:
        if implementation == "fused":
            pytest.skip("the fused implementation runs eagerly only")
        fn = torch.compile(fn, fullgraph=True, backend=compiled)
    leaf = logits.clone().requires_grad_()
    loss = fn(leaf, target)
    loss.sum().backward()
    assert leaf.grad is not None
    assert torch.isnan(loss[0]) and bool(torch.isnan(leaf.grad[0]).all())
    assert torch.isnan(loss[1])
    assert torch.isfinite(loss[2]) and loss[2] > 0 and leaf.grad[2, 1] == 0
    assert loss[3] == inf and bool(torch.isfinite(leaf.grad[3]).all())
    assert loss[4] == 0 and bool((leaf.grad[4] == 0).all())
    assert torch.isfinite(loss[5]) and bool(torch.isfinite(leaf.grad[5]).all())
