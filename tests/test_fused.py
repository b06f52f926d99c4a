"""Behaviour specific to the fused eager path: in-place mode, buffer hand-over, dispatch."""

from __future__ import annotations

import pytest
import torch

from label_relaxation import label_relaxation_loss


def model_logits(
    rows: int = 16, classes: int = 12
) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    linear = torch.nn.Linear(8, classes)
    x = torch.randn(rows, 8)
    target = torch.randint(0, classes, (rows,))
    return linear, x, target


def parameter_grads(
    inplace: bool, reduction: str = "mean", scale: float = 1.0
) -> list[torch.Tensor]:
    """In-place mode runs the chunked kernel's exponent route; the comparison forces it for both
    calls (out of place the CPU would take the softmax route, which rounds differently)."""
    from label_relaxation._impl import fused as _fused
    from label_relaxation._impl import small as _small

    torch.manual_seed(3)
    linear, x, target = model_logits()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_small, "SMALL_ELEMENTS", 0)
        patch.setattr(_fused, "SOFTMAX_ON_CPU", False)
        loss = label_relaxation_loss(
            linear(x) * 2.0,
            target,
            0.1,
            reduction=reduction,
            inplace=inplace,
            implementation="fused",
        )
    (loss.sum() * scale).backward()
    return [p.grad.clone() for p in linear.parameters() if p.grad is not None]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_inplace_gives_the_same_parameter_gradients(reduction: str, scale: float) -> None:
    expected = parameter_grads(False, reduction, scale)
    got = parameter_grads(True, reduction, scale)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_inplace_writes_the_gradient_into_the_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    from label_relaxation._impl import fused as _fused
    from label_relaxation._impl import small as _small

    monkeypatch.setattr(_small, "SMALL_ELEMENTS", 0)  # in-place runs the chunked kernel
    monkeypatch.setattr(_fused, "SOFTMAX_ON_CPU", False)  # and its exponent route: both calls
    linear, x, target = model_logits()
    logits = linear(x)
    original = logits.detach().clone()
    label_relaxation_loss(logits, target, 0.1, reduction="sum", inplace=True).backward()
    leaf = original.clone().requires_grad_()
    label_relaxation_loss(leaf, target, 0.1, reduction="sum").backward()
    assert leaf.grad is not None
    torch.testing.assert_close(logits.detach(), leaf.grad, rtol=0, atol=0)


def test_inplace_refuses_a_leaf() -> None:
    leaf = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(
        ValueError, match=r"inplace=True cannot overwrite logits that are \(a view of\) a leaf"
    ):
        label_relaxation_loss(leaf, torch.tensor([0, 1, 2, 3]), inplace=True)
    with pytest.raises(ValueError, match="a leaf tensor requiring grad"):
        label_relaxation_loss(leaf.view(2, 2, 5), torch.tensor([[0, 1], [2, 3]]), inplace=True)
    with pytest.raises(ValueError, match="a leaf tensor requiring grad"):
        label_relaxation_loss(leaf[1:], torch.tensor([1, 2, 3]), inplace=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda h: h.exp(),
        lambda h: torch.sigmoid(h),
        lambda h: torch.relu(h),
        lambda h: torch.tanh(h).reshape(4, 5),
        lambda h: h.exp()[:, :5],
    ],
)
def test_inplace_refuses_logits_saved_by_their_producer(make) -> None:  # type: ignore[no-untyped-def]
    h = torch.randn(4, 5, requires_grad=True)
    logits = make(h)
    with pytest.raises(ValueError, match="saved them for its own backward"):
        label_relaxation_loss(logits, torch.tensor([0, 1, 2, 3]), inplace=True)


def test_inplace_overwrite_of_logits_another_node_saved_is_caught_by_autograd() -> None:
    h = torch.randn(4, 5, requires_grad=True)
    logits = h * 3.0
    other = (logits**2).sum()  # pow saves logits for its backward
    loss = label_relaxation_loss(logits, torch.tensor([0, 1, 2, 3]), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_without_grad_leaves_logits_untouched() -> None:
    logits = torch.randn(4, 5)
    before = logits.clone()
    label_relaxation_loss(logits, torch.tensor([0, 1, 2, 3]), inplace=True)
    assert torch.equal(logits, before)


def test_double_backward_raises_and_names_the_alternative() -> None:
    logits = torch.randn(4, 5, requires_grad=True)
    loss = label_relaxation_loss(logits, torch.tensor([0, 1, 2, 3]), implementation="fused")
    with pytest.raises(RuntimeError, match="implementation='reference'"):
        torch.autograd.grad(loss, logits, create_graph=True)


def test_hessian_through_autograd_functional_raises() -> None:
    target = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="implementation='reference'"):
        torch.autograd.functional.hessian(
            lambda z: label_relaxation_loss(z, target, implementation="fused"), torch.randn(2, 3)
        )
    hessian = torch.autograd.functional.hessian(
        lambda z: label_relaxation_loss(z, target, implementation="reference"),
        torch.randn(2, 3, dtype=torch.float64),
    )
    assert hessian.shape == (2, 3, 2, 3)


@pytest.mark.parametrize("by_cross_entropy", [False, True])
def test_retain_graph_with_scaled_gradient(
    monkeypatch: pytest.MonkeyPatch, by_cross_entropy: bool
) -> None:
    """The kernel scales its stored gradient in place and refuses a second pass clearly; the
    route through cross-entropy's nodes keeps its graph reusable."""
    from label_relaxation._impl import small as _small

    monkeypatch.setattr(_small, "CROSS_ENTROPY_GRADIENT", by_cross_entropy)
    logits = torch.randn(4, 5, requires_grad=True)
    loss = label_relaxation_loss(logits, torch.tensor([0, 1, 2, 3]), implementation="fused")
    (loss * 0.5).backward(retain_graph=True)
    if not by_cross_entropy:
        with pytest.raises(RuntimeError, match="backward was called a second time"):
            (loss * 0.5).backward()
        return
    assert logits.grad is not None
    first = logits.grad.clone()
    (loss * 0.5).backward()
    torch.testing.assert_close(logits.grad, 2 * first)


def test_retain_graph_with_unit_gradient_works() -> None:
    logits = torch.randn(4, 5, requires_grad=True)
    loss = label_relaxation_loss(logits, torch.tensor([0, 1, 2, 3]), implementation="fused")
    loss.backward(retain_graph=True)
    assert logits.grad is not None
    first = logits.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * first)


def test_no_grad_forward_builds_no_graph() -> None:
    logits = torch.randn(4, 5, requires_grad=True)
    with torch.no_grad():
        loss = label_relaxation_loss(logits, torch.tensor([0, 1, 2, 3]))
    assert loss.grad_fn is None and not loss.requires_grad


def test_fused_refuses_transforms_when_forced() -> None:
    with pytest.raises(RuntimeError, match="implementation='fused' runs in plain eager mode only"):
        torch.func.grad(
            lambda z: label_relaxation_loss(z, torch.tensor([0, 1]), implementation="fused")
        )(torch.randn(2, 3))


def test_forward_mode_ad_uses_the_pure_formulation() -> None:
    import torch.autograd.forward_ad as fwAD

    logits = torch.randn(3, 4, dtype=torch.float64)
    tangent = torch.randn(3, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    with fwAD.dual_level():
        dual = fwAD.make_dual(logits, tangent)
        jvp = fwAD.unpack_dual(label_relaxation_loss(dual, target, 0.2)).tangent
    leaf = logits.clone().requires_grad_()
    label_relaxation_loss(leaf, target, 0.2).backward()
    assert leaf.grad is not None
    torch.testing.assert_close(jvp, (leaf.grad * tangent).sum())


def test_alpha_requiring_grad_gets_its_gradient() -> None:
    """A differentiable alpha sends the call to the pure formulation: no silent None."""
    logits = torch.randn(6, 4, dtype=torch.float64) * 3
    alpha = torch.full((6,), 0.2, dtype=torch.float64, requires_grad=True)
    label_relaxation_loss(logits, torch.randint(0, 4, (6,)), alpha).backward()
    assert alpha.grad is not None and bool((alpha.grad != 0).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_non_cpu_path_reads_no_values(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, inplace: bool
) -> None:
    """On devices other than the CPU the fused path must not read values back to the host.

    Meta tensors stand in for a GPU here: they have no values, so any ``.item()``, ``bool()``
    or data-dependent branch raises. Small device chunks exercise the chunk loop too.
    """
    from label_relaxation._impl import fused as _fused

    monkeypatch.setattr(_fused, "DEVICE_CHUNK_ELEMENTS", 4 * 1000)
    leaf = torch.randn(64, 1000, device="meta", dtype=dtype, requires_grad=True)
    logits = leaf * 1.0
    target = torch.randint(0, 1000, (64,), device="meta")
    weight = torch.rand(1000, device="meta")
    loss = label_relaxation_loss(
        logits,
        target,
        torch.full((64,), 0.1, device="meta"),
        weight=weight,
        inplace=inplace,
        implementation="fused",
        validate=False,
    )
    loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32
    assert leaf.grad is not None and leaf.grad.shape == (64, 1000) and leaf.grad.dtype == dtype


def test_small_kernel_constants_made_in_inference_mode_serve_training() -> None:
    """The small-input kernel caches its scalar operands per alpha; the first call may come
    from inside torch.inference_mode() (an evaluation loop), and a training call must then
    still work and match a fresh computation."""
    from label_relaxation._impl import small as _small

    _small._constants.cache_clear()
    logits = torch.randn(8, 5) * 3
    target = torch.randint(0, 5, (8,))
    with torch.inference_mode():
        evaluated = label_relaxation_loss(logits, target, 0.37)
    leaf = logits.clone().requires_grad_()
    trained = label_relaxation_loss(leaf, target, 0.37)
    trained.backward()
    reference = logits.clone().requires_grad_()
    expected = label_relaxation_loss(reference, target, 0.37, implementation="reference")
    expected.backward()
    torch.testing.assert_close(evaluated, expected.detach())
    torch.testing.assert_close(trained.detach(), expected.detach())
    torch.testing.assert_close(leaf.grad, reference.grad)


def test_small_kernel_constants_stay_on_the_cpu_under_another_default_device() -> None:
    """The cached scalar operands are made on the CPU even when the caller has set another
    default device (here "meta") for new tensors."""
    from label_relaxation._impl import small as _small

    _small._constants.cache_clear()
    logits = torch.randn(8, 5) * 3
    target = torch.randint(0, 5, (8,))
    with torch.device("meta"):
        loss = label_relaxation_loss(logits, target, 0.29)
    expected = label_relaxation_loss(logits, target, 0.29, implementation="reference")
    torch.testing.assert_close(loss, expected)


def test_gradient_chunks_take_a_quarter_of_the_cache_within_bounds() -> None:
    from label_relaxation._impl import fused as _fused

    mib = 1 << 20
    assert _fused.gradient_chunk_elements(None) == _fused.CHUNK_ELEMENTS
    assert _fused.gradient_chunk_elements(32 * mib) == 2 * mib  # 8 MiB of float32
    assert _fused.gradient_chunk_elements(4 * mib) == _fused.CHUNK_ELEMENTS  # lower bound
    assert _fused.gradient_chunk_elements(480 * mib) == 30 * mib  # 120 MiB of float32
    assert _fused.gradient_chunk_elements(4096 * mib) == 32 * mib  # upper bound, 128 MiB


def test_only_chunks_written_into_the_gradient_take_the_cache_sized_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chunks that work in a float32 scratch buffer (forward only, half-precision gradients)
    keep the 8 MiB bound on that buffer, whatever the cache."""
    from label_relaxation._impl import fused as _fused
    from label_relaxation._impl import small as _small

    monkeypatch.setattr(_fused, "GRADIENT_CHUNK_ELEMENTS", 1 << 24)
    logits = torch.empty(8, 32)
    assert _fused.chunk_rows(logits, scratch=False) == (1 << 24) // 32
    assert _fused.chunk_rows(logits, forward_only=True) == _fused.CHUNK_ELEMENTS // 32
    assert _fused.chunk_rows(logits) == _fused.CHUNK_ELEMENTS // 32
    # Forward only, wide rows: the 2 MiB bound, but never fewer rows than the minimum.
    rows_of_1000 = _fused.chunk_rows(torch.empty(8, 1000), forward_only=True)
    assert rows_of_1000 == _fused.FORWARD_CHUNK_ELEMENTS // 1000
    wide = torch.empty(8, 128256)
    assert _fused.chunk_rows(wide, forward_only=True) == _fused.FORWARD_CHUNK_MIN_ROWS
    widths: list[int] = []
    real_chunk_rows = _fused.chunk_rows

    def recording(logits: torch.Tensor, forward_only: bool = False, scratch: bool = True) -> int:
        widths.append(real_chunk_rows(logits, forward_only, scratch))
        return widths[-1]

    monkeypatch.setattr(_fused, "chunk_rows", recording)
    monkeypatch.setattr(_small, "SMALL_ELEMENTS", 0)  # the chunked kernel, as at large sizes
    target = torch.zeros(8, dtype=torch.long)
    for dtype, expected in ((torch.float32, 1 << 24), (torch.bfloat16, _fused.CHUNK_ELEMENTS)):
        leaf = torch.randn(8, 32).to(dtype).requires_grad_()
        label_relaxation_loss(leaf, target, 0.1).backward()
        assert widths[-1] == expected // 32, dtype


def test_cpu_gradients_take_the_softmax_route_on_rows_of_32_classes_or_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from label_relaxation._impl import fused as _fused
    from label_relaxation._impl import small as _small

    monkeypatch.setattr(_small, "SMALL_ELEMENTS", 0)
    routes: list[str] = []
    for name in ("_probabilities", "_exponent_masses"):
        real = getattr(_fused, name)

        def recording(*args: object, real: object = real, name: str = name) -> None:
            routes.append(name)
            real(*args)  # type: ignore[operator]

        monkeypatch.setattr(_fused, name, recording)
    for classes, grad, inplace, expected in (
        (40, True, False, "_probabilities"),
        (_fused.SOFTMAX_MIN_CLASSES - 1, True, False, "_exponent_masses"),
        (40, False, False, "_exponent_masses"),  # forward only: a small scratch buffer
        (40, True, True, "_exponent_masses"),  # in place: the logits are the gradient
    ):
        logits = torch.randn(6, classes, requires_grad=grad)
        target = torch.randint(0, classes, (6,))
        if inplace:
            logits = logits * 1.0
        label_relaxation_loss(logits, target, 0.1, inplace=inplace)
        assert routes[-1] == expected, (classes, grad, inplace)


def test_only_the_common_call_skips_the_general_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain (N, C) logits with (N,) int64 targets skip the checks below the common-call test;
    every other form takes them, and all forms give the same loss and gradient."""
    from label_relaxation import functional as _functional

    checked: list[bool] = []
    real_check = _functional.check.check_target_kind

    def recording(target: torch.Tensor, logits: torch.Tensor) -> bool:
        checked.append(True)
        return real_check(target, logits)

    monkeypatch.setattr(_functional.check, "check_target_kind", recording)
    torch.manual_seed(5)
    values = torch.randn(12, 7) * 3
    target = torch.randint(0, 7, (12,))

    def loss_and_grad(leaf: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss = label_relaxation_loss(leaf, labels, 0.2)
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad.reshape(12, 7)

    common = loss_and_grad(values.clone().requires_grad_(), target)
    assert checked == []
    for leaf, labels in (
        (torch.nn.Parameter(values.clone()), target),  # a subclass
        (values.clone().requires_grad_(), target.int()),  # another integer dtype
        (values.clone().reshape(3, 4, 7).requires_grad_(), target.reshape(3, 4)),  # (B, S, C)
    ):
        checked.clear()
        other = loss_and_grad(leaf, labels)
        assert checked == [True]
        torch.testing.assert_close(other, common, rtol=0, atol=0)
