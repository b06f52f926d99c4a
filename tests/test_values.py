"""Values and gradients against the float64 explicit projection, on both implementations."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from label_relaxation import label_relaxation_loss
from tests.reference import expected_gradient, loss_scale, projected_kl

# float32 carries ~6e-8 relative rounding per operation; the closed form takes about ten
# operations, so 1e-6 of the terms' magnitude (loss_scale) bounds it with margin.
RTOL32 = 1e-6
# Gradient entries are p_k - q_k. Besides a few ulp of p_k + q_k, each entry inherits the
# rounding of the float32 difference z_k - max(z), which exp() turns into a relative error of
# about eps·|z_k - max(z)| (cross-entropy has the same). Below float32's normal range nothing is
# representable, hence the absolute floor. Row-wise, relative to the row's largest entry, the
# gradient must meet RTOL32 without the conditioning term.
EPS32 = float(torch.finfo(torch.float32).eps)
TINY32 = float(torch.finfo(torch.float32).tiny) * 8


def loss_and_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float | torch.Tensor,
    implementation: str,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().clone().requires_grad_()
    loss = label_relaxation_loss(
        leaf, target, alpha, reduction="none", implementation=implementation, **kwargs
    )  # type: ignore[arg-type]
    loss.sum().backward()
    assert leaf.grad is not None
    return loss.detach(), leaf.grad


def assert_matches_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float | torch.Tensor,
    implementation: str,
    loss: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
) -> None:
    if loss is None or grad is None:
        loss, grad = loss_and_grad(logits, target, alpha, implementation)
    ref = projected_kl(logits, target, alpha)
    scale = loss_scale(logits, target, alpha)
    err = (loss.double() - ref).abs()
    assert bool((err <= RTOL32 * scale).all()), (
        f"max loss error {(err / scale).max():.3e} of the terms' scale"
    )
    p_ref = torch.softmax(logits.double(), -1)
    g_ref = expected_gradient(logits, target, alpha)
    q_ref = p_ref - g_ref
    g_err = (grad.double() - g_ref).abs()
    # The target entry p_y - q_y is computed as alpha - r (r = 1 - p_y, summed directly): its
    # rounding scales with alpha + r, which can exceed p_y + q_y many times when p_y is small.
    is_target = torch.nn.functional.one_hot(target, logits.shape[-1]).bool()
    alpha_t = torch.as_tensor(alpha, dtype=torch.float64).expand(target.shape)[:, None]
    r_ref = torch.where(is_target, 0.0, p_ref).sum(-1, keepdim=True)
    magnitude = p_ref + q_ref.abs() + torch.where(is_target, alpha_t + r_ref, 0.0)
    gap = (logits.double() - logits.double().amax(-1, keepdim=True)).abs()
    g_tol = (RTOL32 + 2 * EPS32 * gap) * magnitude + TINY32
    assert bool((g_err <= g_tol).all()), (
        f"max gradient error {(g_err / g_tol).max():.3e} of tolerance"
    )
    row_err = g_err.amax(-1) / magnitude.amax(-1)
    assert bool((row_err <= RTOL32).all()), f"max row-relative gradient error {row_err.max():.3e}"


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 100.0, 1e3, 1e4])
@pytest.mark.parametrize("num_classes", [2, 7, 1000])
def test_float32_matches_float64_reference(
    implementation: str, scale: float, num_classes: int
) -> None:
    logits = torch.randn(256, num_classes) * scale
    target = torch.randint(0, num_classes, (256,))
    for alpha in (1e-5, 0.01, 0.1, 0.5, 0.9):
        assert_matches_reference(logits, target, alpha, implementation)


@pytest.mark.parametrize("offset", [1e3, -5e3, 3e4])
@pytest.mark.parametrize("num_classes", [7, 1003])
def test_large_common_offset_keeps_precision(
    implementation: str, offset: float, num_classes: int
) -> None:
    """Logits far from 0 but close together: only their differences may be rounded.

    Softmax ignores a common offset. Scaling the logits by log2(e) with a separate rounding
    before subtracting the shift would cost eps·|z| (~2e-3 at 3e4) of relative precision;
    the tolerance (gap-dependent, as above) allows only eps·|z - max z|. Class counts 7 and
    1003 exercise the scalar tail of vectorised kernels.
    """
    logits = (torch.randn(64, num_classes, dtype=torch.float64) * 3 + offset).float()
    target = torch.randint(0, num_classes, (64,))
    for alpha in (0.01, 0.1, 0.5):
        assert_matches_reference(logits, target, alpha, implementation)


def test_float64_matches_reference_tightly(implementation: str) -> None:
    logits = torch.randn(128, 50, dtype=torch.float64) * 5
    target = torch.randint(0, 50, (128,))
    loss, grad = loss_and_grad(logits, target, 0.2, implementation)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, projected_kl(logits, target, 0.2), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grad, expected_gradient(logits, target, 0.2), rtol=1e-11, atol=1e-14)


def test_gradcheck_float64(implementation: str) -> None:
    logits = (torch.randn(6, 5, dtype=torch.float64) * 2).requires_grad_()
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    alpha = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    for reduction in ("none", "mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda z, reduction=reduction: label_relaxation_loss(
                z, target, alpha, reduction=reduction, implementation=implementation
            ),
            (logits,),
        )


def test_decision_right_for_tiny_alpha(implementation: str) -> None:
    """Rows built with non-target mass just above and below alpha = 1e-5 are judged right."""
    alpha = 1e-5
    rows, num_classes = 400, 20
    relative = torch.linspace(-0.2, 0.2, rows, dtype=torch.float64)
    relative = torch.where(relative.abs() < 1e-3, 1e-3, relative)
    r = alpha * (1 + relative)
    # Target logit 0, the other 19 equal: r = 19 e^c / (1 + 19 e^c)  =>  c = log(r / (19 (1 - r))).
    c = torch.log(r / ((num_classes - 1) * (1 - r)))
    logits = c[:, None].expand(rows, num_classes).clone()
    logits[:, 0] = 0
    logits32 = logits.float()
    target = torch.zeros(rows, dtype=torch.long)
    loss, grad = loss_and_grad(logits32, target, alpha, implementation)
    inside_ref = projected_kl(logits32, target, alpha) == 0
    assert bool(((loss == 0) == inside_ref).all())
    assert bool((grad[inside_ref] == 0).all())
    assert int(inside_ref.sum()) == int((relative < 0).sum())
    # Without a gradient the kernels decide without forming r - alpha: same decision.
    with torch.no_grad():
        forward_only = label_relaxation_loss(
            logits32, target, alpha, reduction="none", implementation=implementation
        )
    assert bool(((forward_only == 0) == inside_ref).all())


def test_exact_zero_inside_the_set(implementation: str) -> None:
    logits = torch.tensor([[8.0, 0.0, 0.0], [3.0, 3.0, 3.0], [0.0, 50.0, -4.0]])
    target = torch.tensor([0, 1, 1])
    loss, grad = loss_and_grad(logits, target, 0.1, implementation)
    assert loss[0] == 0 and loss[2] == 0 and loss[1] > 0
    assert bool((grad[0] == 0).all()) and bool((grad[2] == 0).all())
    assert torch.allclose(grad.sum(-1), torch.zeros(3), atol=1e-7)


def test_saturated_and_masked_rows_are_finite(implementation: str) -> None:
    inf = float("inf")
    logits = torch.tensor(
        [
            [-inf, 2.0, -inf, -inf],  # only the target is finite: inside the set
            [0.0, -inf, 1.0, -inf],  # part of the vocabulary masked
            [1e4, -1e4, 0.0, 3.0],  # saturated, target is the argmax
            [-1e4, 1e4, 0.0, 3.0],  # saturated, target far below: p_y underflows
            [80.0, -80.0, 0.0, 0.0],
        ]
    )
    target = torch.tensor([1, 2, 0, 0, 1])
    loss, grad = loss_and_grad(logits, target, 0.1, implementation)
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
    assert loss[0] == 0 and bool((grad[0] == 0).all()) and loss[2] == 0
    finite = torch.isfinite(logits)
    ref = projected_kl(logits, target, 0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    g_ref = expected_gradient(logits, target, 0.1)
    torch.testing.assert_close(grad.double()[finite], g_ref[finite], rtol=1e-6, atol=1e-7)
    assert bool((grad[~finite] == 0).all())
    # Without a gradient the small-input kernel works in log space: log(rest) is -inf in the
    # first row, and the fourth row's p_y underflows.
    with torch.no_grad():
        forward_only = label_relaxation_loss(
            logits, target, 0.1, reduction="none", implementation=implementation
        )
    assert forward_only[0] == 0 and forward_only[2] == 0
    torch.testing.assert_close(forward_only.double(), ref, rtol=1e-6, atol=0)


def test_target_probability_near_and_below_the_smallest_normal(implementation: str) -> None:
    """Targets 80-110 below the row maximum: p_y from a normal number down to a subnormal and 0.

    Where p_y is no longer a normal float32, its logarithm must come from the logits (the
    softmax route recomputes those rows); the loss then grows like (1-alpha)·(m - z_y).
    """
    gaps = torch.tensor([80.0, 83.0, 85.0, 86.5, 87.5, 88.0, 90.0, 95.0, 100.0, 103.5, 110.0])
    logits = torch.zeros(gaps.numel(), 5)
    logits[:, 0] = gaps  # the maximum
    logits[:, 2] = -1.0
    target = torch.full((gaps.numel(),), 1)
    loss, grad = loss_and_grad(logits, target, 0.1, implementation)
    ref = projected_kl(logits, target, 0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    g_ref = expected_gradient(logits, target, 0.1)
    torch.testing.assert_close(grad.double(), g_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(implementation: str, dtype: torch.dtype) -> None:
    logits = (torch.randn(64, 33) * 3).to(dtype)
    target = torch.randint(0, 33, (64,))
    loss, grad = loss_and_grad(logits, target, 0.1, implementation)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # The inputs are exact in float32, so the loss is float32-accurate; the gradient is rounded
    # once to the half dtype.
    ref = projected_kl(logits.float(), target, 0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    g_ref = expected_gradient(logits.float(), target, 0.1)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad.double(), g_ref, rtol=eps, atol=eps * 1e-2)


def test_autocast_cpu_bfloat16(implementation: str) -> None:
    linear = torch.nn.Linear(16, 10)
    x = torch.randn(32, 16)
    target = torch.randint(0, 10, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = linear(x)
        assert logits.dtype == torch.bfloat16
        loss = label_relaxation_loss(logits, target, 0.1, implementation=implementation)
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
    loss.backward()
    assert linear.weight.grad is not None and bool(torch.isfinite(linear.weight.grad).all())
    ref = projected_kl(logits.detach().float(), target, 0.1).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_per_sample_alpha(implementation: str) -> None:
    logits = torch.randn(4, 6, 9) * 2
    target = torch.randint(0, 9, (4, 6))
    alpha = torch.rand(4, 6) * 0.5 + 0.01
    loss, grad = loss_and_grad(logits, target, alpha, implementation)
    flat = logits.reshape(-1, 9), target.reshape(-1), alpha.reshape(-1)
    torch.testing.assert_close(loss.reshape(-1).double(), projected_kl(*flat), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        grad.reshape(-1, 9).double(), expected_gradient(*flat), rtol=1e-6, atol=1e-7
    )
    # A broadcastable alpha: one per sequence position.
    per_position = torch.rand(6) * 0.3 + 0.05
    loss_b, _ = loss_and_grad(logits, target, per_position, implementation)
    loss_e, _ = loss_and_grad(
        logits, target, per_position.expand(4, 6).contiguous(), implementation
    )
    torch.testing.assert_close(loss_b, loss_e, rtol=0, atol=0)


def test_single_row(implementation: str) -> None:
    logits = torch.randn(12)
    target = torch.tensor(3)
    loss, grad = loss_and_grad(logits, target, 0.1, implementation)
    assert loss.shape == () and grad.shape == (12,)
    ref = projected_kl(logits[None], target[None], 0.1)[0]
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    mean = label_relaxation_loss(logits, target, 0.1, implementation=implementation)  # type: ignore[arg-type]
    torch.testing.assert_close(mean, loss)


@pytest.mark.parametrize("implementation_", ["fused", "reference"])
def test_large_chunked_input_with_weights_and_ignored_rows(
    monkeypatch: pytest.MonkeyPatch, implementation_: str
) -> None:
    """Several chunks of the fused path, per-row alpha, class weights and ignored rows."""
    from label_relaxation._impl import fused as _fused

    # The gradient's chunks are sized by this machine's cache: here the 8 MiB bound.
    monkeypatch.setattr(_fused, "GRADIENT_CHUNK_ELEMENTS", _fused.CHUNK_ELEMENTS)
    rows, classes = 3 * (_fused.CHUNK_ELEMENTS // 4099) + 5, 4099
    logits = torch.randn(rows, classes) * 4
    target = torch.randint(0, classes, (rows,))
    target[::7] = -100
    alpha = torch.rand(rows) * 0.3 + 0.01
    weight = torch.rand(classes) + 0.5
    loss, grad = loss_and_grad(logits, target, alpha, implementation_, weight=weight)
    ignored = target == -100
    assert bool((loss[ignored] == 0).all()) and bool((grad[ignored] == 0).all())
    kept = ~ignored
    row_weight = weight[target[kept]]
    assert_matches_reference(
        logits[kept],
        target[kept],
        alpha[kept],
        implementation_,
        loss[kept] / row_weight,
        grad[kept] / row_weight[:, None],
    )


def rows_just_outside(alpha: float, rows: int = 300, num_classes: int = 50) -> torch.Tensor:
    """float32 logits whose non-target mass r lies between 1.5·alpha and 3·alpha (target 0)."""
    generator = torch.Generator().manual_seed(1)
    r = alpha * (1.5 + 1.5 * torch.rand(rows, generator=generator, dtype=torch.float64))
    others = torch.randn(rows, num_classes - 1, generator=generator, dtype=torch.float64)
    # With target logit 0: r / (1 - r) = sum exp(others + shift).
    shift = torch.log(r / (1 - r)) - torch.logsumexp(others, -1)
    offset = 3 * torch.randn(rows, 1, generator=generator, dtype=torch.float64)
    zeros = torch.zeros(rows, 1, dtype=torch.float64)
    return (torch.cat([zeros, others + shift[:, None]], 1) + offset).float()


@pytest.mark.parametrize("alpha", [1e-5, 1e-3, 0.1, 0.3])
def test_loss_relative_precision_just_outside_the_set(implementation: str, alpha: float) -> None:
    """The loss relative to itself, where it is far smaller than its two terms.

    Just outside the set (r = k·alpha, 1.5 <= k <= 3) the loss is about alpha·(k-1)²/(2k), and
    its relative sensitivity to r is (r - alpha)/loss <= 6, so float32's relative error of r
    (a few ulp per summed mass, ~1e-6) allows about 1e-5; measured up to 1.2e-5 on every path
    with a gradient, and up to 1.6e-5 without one with 1000-32000 classes (whose per-row part
    works in log space: two logs of up to |log alpha| with their rounding), hence 5e-5.
    log(1 - r) in place of log1p(-r) gives 3e-2 here. At alpha >= 0.1 the forward
    pass of these 50-class rows takes r from cross-entropy (measured 6.5e-6 at 0.1); with 1000
    classes that would reach 2.0e-5, hence its bound of 128 classes.
    """
    logits = rows_just_outside(alpha)
    target = torch.zeros(logits.shape[0], dtype=torch.long)
    loss, grad = loss_and_grad(logits, target, alpha, implementation)
    # The gradient where (r - alpha)/r is smallest, on the route that takes r from
    # cross-entropy too (alpha >= 0.1).
    assert_matches_reference(logits, target, alpha, implementation, loss, grad)
    with torch.no_grad():
        forward_only = label_relaxation_loss(
            logits, target, alpha, reduction="none", implementation=implementation
        )
    reference = projected_kl(logits, target, alpha)
    assert bool((reference > 0).all())
    for computed in (loss, forward_only):
        relative = ((computed.double() - reference).abs() / reference).max()
        assert relative <= 5e-5, f"max relative loss error {relative:.2e}"


def forward_only_and_reference(
    logits: torch.Tensor, target: torch.Tensor, alpha: float, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss without a gradient, and the float64 pure formulation's with the same arguments."""
    with torch.no_grad():
        loss = label_relaxation_loss(logits, target, alpha, **kwargs)
    weight = kwargs.get("weight")
    kwargs["weight"] = None if weight is None else weight.double()
    expected = label_relaxation_loss(
        logits.double(), target, alpha, implementation="reference", **kwargs
    )
    return loss, expected


@pytest.mark.parametrize(
    ("rows", "num_classes", "narrow_limited", "by_cross_entropy"),
    [
        (4096, 2, True, True),
        (256, 7, True, True),
        (1024, 7, True, False),
        (1024, 7, False, True),
        (256, 128, True, True),
        (256, 129, False, False),
        (256, 1000, False, False),
    ],
)
def test_forward_only_small_inputs_on_both_routes(
    monkeypatch: pytest.MonkeyPatch,
    rows: int,
    num_classes: int,
    narrow_limited: bool,
    by_cross_entropy: bool,
) -> None:
    """Without a gradient, small inputs take -log p_y from cross-entropy (alpha >= 0.1, at most
    128 classes, no class weights; rows of 3-15 classes up to 4096 logits only, but where the
    CPU runs ATen's AVX2 kernels) or the log-space kernel; both meet RTOL32 of the terms, and
    rows clearly inside the set are exactly 0."""
    from label_relaxation._impl import small as _small

    monkeypatch.setattr(_small, "CROSS_ENTROPY_NARROW_LIMITED", narrow_limited)
    routed: list[float] = []
    real_route = _small._by_cross_entropy

    def recording(*args: object, **kwargs: object) -> torch.Tensor | None:
        routed.append(float(args[2]))  # type: ignore[arg-type]
        return real_route(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_small, "_by_cross_entropy", recording)
    generator = torch.Generator().manual_seed(num_classes)
    alphas = (0.05, 0.1, 0.5, 0.9)
    for scale in (0.1, 1.0, 10.0, 100.0, 1e4):
        logits = torch.randn(rows, num_classes, generator=generator) * scale
        target = torch.randint(0, num_classes, (rows,), generator=generator)
        p_ref = torch.softmax(logits.double(), -1)
        r_ref = 1 - p_ref.gather(-1, target[:, None]).squeeze(-1)
        for alpha in alphas:
            with torch.no_grad():
                loss = label_relaxation_loss(logits, target, alpha, reduction="none")
            ref = projected_kl(logits, target, alpha)
            err = (loss.double() - ref).abs() / loss_scale(logits, target, alpha)
            assert bool((err <= RTOL32).all()), f"max loss error {err.max():.3e} of the scale"
            assert bool((loss[r_ref <= 0.99 * alpha] == 0).all())
    assert routed == ([a for a in alphas if a >= 0.1] * 5 if by_cross_entropy else [])


@pytest.mark.parametrize("ignore_index", [-100, 3, 10])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_only_cross_entropy_route_semantics(ignore_index: int, reduction: str) -> None:
    """Ignored rows (below, inside and above the class range), any integer target dtype and
    batch shape, and an all-ignored batch, against the float64 general path."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 10, generator=generator) * 4
    target = torch.randint(0, 10, (3, 5), generator=generator)
    target[0, 1:4] = ignore_index
    logits[0, 2] = float("nan")  # an ignored row's logits never reach the result
    for target_ in (target, target.int(), torch.full_like(target, ignore_index)):
        loss, expected = forward_only_and_reference(
            logits, target_, 0.2, ignore_index=ignore_index, reduction=reduction
        )
        assert loss.dtype == torch.float32 and loss.shape == expected.shape
        counted = target_ != ignore_index
        # Each counted row within RTOL32 of its terms' scale, as everywhere; a sum or mean
        # within the sum (mean) of those bounds.
        bound = torch.zeros(target_.shape, dtype=torch.float64)
        if bool(counted.any()):
            rows = loss_scale(logits[counted], target_[counted].long(), 0.2)
            bound[counted] = RTOL32 * rows
        if reduction != "none":
            bound = bound.sum() / (max(int(counted.sum()), 1) if reduction == "mean" else 1)
        assert bool(((loss.double() - expected).abs() <= bound).all())
        if reduction == "none":
            assert bool((loss[~counted] == 0).all())


@pytest.mark.parametrize("num_classes", [7, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_forward_only_above_the_small_bound(
    monkeypatch: pytest.MonkeyPatch, num_classes: int, dtype: torch.dtype, alpha: float
) -> None:
    """Without a gradient, inputs above the small-input bound take the chunked statistics (by
    exponent under 64 classes, by softmax from 64, in 4-row chunks here) with the small path's
    per-row part, never cross-entropy's full-size log-softmax (alpha 0.2, 70 classes): ignored
    rows, class weights, int32 targets, 3-D logits and every reduction against the float64
    general path, each counted row within RTOL32 of its terms' scale."""
    from label_relaxation._impl import fused as _fused
    from label_relaxation._impl import small as _small

    monkeypatch.setattr(_small, "SMALL_ELEMENTS", 16)
    monkeypatch.setattr(_fused, "CHUNK_ELEMENTS", 4 * num_classes)
    monkeypatch.setattr(_fused, "FORWARD_CHUNK_ELEMENTS", 4 * num_classes)
    monkeypatch.setattr(_fused, "FORWARD_CHUNK_MIN_ROWS", 1)
    calls = []
    statistics = _small.forward_statistics

    def spy(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(logits.shape)
        return statistics(logits, target)

    monkeypatch.setattr(_small, "forward_statistics", spy)
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, num_classes, generator=generator) * 4).to(dtype)
    target = torch.randint(0, num_classes, (3, 7), generator=generator).int()
    target[1, 2:5] = -100
    logits[1, 3] = float("nan")  # an ignored row's logits never reach the result
    weight = torch.rand(num_classes, generator=generator) + 0.5
    for class_weight in (None, weight):
        for reduction in ("none", "mean", "sum"):
            loss, expected = forward_only_and_reference(
                logits, target, alpha, weight=class_weight, reduction=reduction
            )
            counted = target != -100
            rows = loss_scale(logits[counted].double(), target[counted].long(), alpha)
            if class_weight is not None:
                rows = rows * class_weight.double()[target[counted].long()]
            bound = torch.zeros(target.shape, dtype=torch.float64)
            bound[counted] = RTOL32 * rows
            if reduction != "none":
                total = int(counted.sum()) if class_weight is None else None
                denominator = (
                    class_weight.double()[target[counted].long()].sum() if total is None else total
                )
                bound = bound.sum() / (denominator if reduction == "mean" else 1)
            assert bool(((loss.double() - expected).abs() <= bound).all())
    assert len(calls) == 6 and all(shape == (21, num_classes) for shape in calls)


@pytest.mark.parametrize("rows", [8, 9, 10, 17, 18, 19, 28])
def test_chunk_edges_with_odd_row_counts(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """The chunked kernel with 9-row chunks: row counts just around one, two and three chunks."""
    from label_relaxation._impl import fused as _fused
    from label_relaxation._impl import small as _small

    monkeypatch.setattr(_small, "SMALL_ELEMENTS", 0)
    monkeypatch.setattr(_fused, "CHUNK_ELEMENTS", 9 * 7)
    monkeypatch.setattr(_fused, "GRADIENT_CHUNK_ELEMENTS", 9 * 7)
    logits = torch.randn(rows, 7) * 3
    target = torch.randint(0, 7, (rows,))
    assert_matches_reference(logits, target, 0.2, "fused")


def test_small_kernel_mean_gradient_at_its_largest_batch() -> None:
    """The mean over 2^19 rows of 2 classes, the most rows the small-input kernel takes.

    Its gradient scales each row by w/total with the mean's w = 2^-19, the smallest shared
    weight the kernel folds into its constants. Row-wise it must meet RTOL32, as in
    assert_matches_reference (measured: 1.0-1.1e-7; w/total as exp(log w - log(total)) came to
    0.96e-6, inside RTOL32 but without margin, which is why the kernel divides).
    """
    from label_relaxation._impl import small as _small

    rows, classes = _small.SMALL_ELEMENTS // 2, 2
    logits = torch.randn(rows, classes) * 3
    target = torch.randint(0, classes, (rows,))
    for alpha in (1e-3, 0.1):
        leaf = logits.clone().requires_grad_()
        label_relaxation_loss(leaf, target, alpha).backward()
        assert leaf.grad is not None
        g_ref = expected_gradient(logits, target, alpha)
        p_ref = torch.softmax(logits.double(), -1)
        magnitude = (p_ref + (p_ref - g_ref).abs()).amax(-1)
        row_err = (leaf.grad.double() * rows - g_ref).abs().amax(-1) / magnitude
        assert bool((row_err <= RTOL32).all()), f"max row-relative error {row_err.max():.3e}"


@pytest.mark.parametrize("rows", [8, 9, 10, 17, 18, 19])
def test_forward_only_chunk_edges_of_wide_rows(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """Forward only, rows of 70 classes in 9-row chunks (the forward-only chunk bound)."""
    from label_relaxation._impl import fused as _fused
    from label_relaxation._impl import small as _small

    classes = 70
    assert classes >= _fused.FORWARD_CHUNK_MIN_CLASSES
    monkeypatch.setattr(_small, "SMALL_ELEMENTS", 0)
    monkeypatch.setattr(_fused, "FORWARD_CHUNK_ELEMENTS", 9 * classes)
    monkeypatch.setattr(_fused, "FORWARD_CHUNK_MIN_ROWS", 9)
    logits = rows_just_outside(1e-3, rows, classes)
    assert _fused.chunk_rows(logits, forward_only=True) == 9
    target = torch.zeros(rows, dtype=torch.long)
    target[1::4] = -100  # on both sides of chunk boundaries, not on all of them
    with torch.no_grad():
        loss = label_relaxation_loss(logits, target, 1e-3, reduction="none")
    counted = target != -100
    reference = projected_kl(logits[counted], target[counted], 1e-3)
    assert bool((loss[~counted] == 0).all())
    # The relative precision just outside the set (see the test above).
    relative = ((loss[counted].double() - reference).abs() / reference).max()
    assert relative <= 5e-5, f"max relative loss error {relative:.2e}"


def test_weighted_ignored_rows_at_chunk_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Class weights with ignored rows on both sides of each chunk boundary (9-row chunks)."""
    from label_relaxation._impl import fused as _fused
    from label_relaxation._impl import small as _small

    monkeypatch.setattr(_small, "SMALL_ELEMENTS", 0)
    monkeypatch.setattr(_fused, "CHUNK_ELEMENTS", 9 * 7)
    monkeypatch.setattr(_fused, "GRADIENT_CHUNK_ELEMENTS", 9 * 7)
    rows = 28
    logits = torch.randn(rows, 7) * 3
    logits[[8, 9, 27]] = float("nan")  # garbage in ignored rows must not leak
    target = torch.randint(0, 7, (rows,))
    ignored = torch.tensor([0, 8, 9, 17, 18, 27])
    target[ignored] = -100
    weight = torch.rand(7) + 0.5
    leaf = logits.clone().requires_grad_()
    loss = label_relaxation_loss(leaf, target, 0.2, weight=weight, implementation="fused")
    loss.backward()
    kept = target != -100
    per_row = projected_kl(logits[kept], target[kept], 0.2) * weight[target[kept]].double()
    expected = per_row.sum() / weight[target[kept]].double().sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    assert leaf.grad is not None
    assert bool((leaf.grad[ignored] == 0).all())
    g_ref = expected_gradient(logits[kept], target[kept], 0.2) * weight[target[kept], None].double()
    g_ref = g_ref / weight[target[kept]].double().sum()
    torch.testing.assert_close(leaf.grad[kept].double(), g_ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    ("alpha", "num_classes", "ignored", "by_cross_entropy"),
    [
        (0.1, 10, False, True),
        (0.05, 10, False, False),
        (0.1, 129, False, False),
        (0.1, 10, True, False),
    ],
)
def test_gradient_route_through_cross_entropy(
    monkeypatch: pytest.MonkeyPatch,
    alpha: float,
    num_classes: int,
    ignored: bool,
    by_cross_entropy: bool,
) -> None:
    """With a gradient, small batches take cross-entropy's nodes within the route's bounds
    (alpha >= 0.1, at most 128 classes) and without ignored rows, whose -inf logits its
    backward would turn into NaN; the kernel otherwise. Both give exact zeros there."""
    from label_relaxation._impl import small as _small

    monkeypatch.setattr(_small, "CROSS_ENTROPY_GRADIENT", True)
    logits = torch.randn(64, num_classes) * 3
    target = torch.randint(0, num_classes, (64,))
    if ignored:
        logits[5], target[5] = float("-inf"), -100
    leaf = logits.clone().requires_grad_()
    loss = label_relaxation_loss(leaf, target, alpha)
    name = type(loss.grad_fn).__name__
    assert name == ("_CrossEntropyRowsBackward" if by_cross_entropy else "FusedLossBackward")
    loss.backward()
    assert leaf.grad is not None
    if ignored:
        assert bool((leaf.grad[5] == 0).all())
    reference = logits.double().requires_grad_()
    expected = label_relaxation_loss(reference, target, alpha, implementation="reference")
    expected.backward()
    assert reference.grad is not None
    torch.testing.assert_close(leaf.grad.double(), reference.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
