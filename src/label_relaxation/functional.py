"""The label relaxation loss as a function: argument handling and choice of implementation."""

from __future__ import annotations

import sys
from typing import Literal, NamedTuple, TypeAlias

import torch
from torch import Tensor

from label_relaxation._impl import small as _small
from label_relaxation._impl import validation as check
from label_relaxation._impl.closed_form import AlphaLike
from label_relaxation._impl.compiled import compiled_rows
from label_relaxation._impl.dynamo_marks import nonstrict_trace_on_import
from label_relaxation._impl.fused import apply_fused, compute_dtype, fused_rows, needs_gradient
from label_relaxation._impl.graph_checks import LABEL_RELAXATION_MESSAGE, raise_if_invalid
from label_relaxation._impl.inplace import check_inplace_allowed
from label_relaxation._impl.reference import reference_rows
from label_relaxation._impl.validation import Reduction

Implementation: TypeAlias = Literal["auto", "fused", "reference"]


class _Rows(NamedTuple):
    """Canonical per-position inputs: flattened to ``(N, C)`` rows, safe to index."""

    logits: Tensor  # (N, C) in the caller's dtype
    target: Tensor  # (N,) int64, every entry a valid class index
    alpha: AlphaLike  # float, or (N,) tensor in the compute dtype
    row_weight: Tensor  # (N,) weight of each row's loss, already divided by the mean's denominator


def _safe_target(
    num_classes: int, target: Tensor, ignore_index: int, eager_checks: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Return ``(index, counted, invalid)`` for an index or one-hot target of ``C`` classes.

    ``index`` is always a valid class (ignored and invalid entries become class 0), so no path
    ever reads out of range; ``counted`` marks positions that contribute; ``invalid`` marks
    positions whose target was bad when the eager checks could not run (else ``None``).
    """
    if not target.is_floating_point():
        if eager_checks:
            check.check_index_values(target, num_classes, ignore_index)
        counted = target != ignore_index
        in_range = (target >= 0) & (target < num_classes)
        index = torch.where(in_range & counted, target, torch.zeros_like(target)).long()
        invalid = None if eager_checks else counted & ~in_range
        return index, counted, invalid
    # One-hot targets follow nn.CrossEntropyLoss's class-probability targets: ignore_index does
    # not apply to them.
    index = target.argmax(-1)
    if eager_checks:
        check.check_one_hot_values(target, index)
        invalid = None
    else:
        invalid = ~check.one_hot_rows_ok(target, index)
    return index, torch.ones_like(index, dtype=torch.bool), invalid


def _prepare(
    logits: Tensor,
    target: Tensor,
    alpha: AlphaLike,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    validate: bool,
) -> _Rows:
    """Check the values and tensor arguments and bring them to the canonical row form.

    ``logits``, ``target``, ``reduction`` and ``weight`` were checked by the caller (metadata
    only).
    """
    num_classes = logits.shape[-1]
    targets = prepare_targets(
        logits.shape[:-1],
        num_classes,
        compute_dtype(logits.dtype),
        target,
        alpha,
        weight,
        ignore_index,
        reduction,
        validate,
    )
    return _Rows(logits.reshape(-1, num_classes), *targets)


class RowTargets(NamedTuple):
    """Per-row target data of ``N`` flattened positions (the loss's inputs but the logits)."""

    target: Tensor  # (N,) int64, every entry a valid class index
    alpha: AlphaLike  # float, or (N,) tensor in the compute dtype
    row_weight: Tensor  # (N,) weight of each row's loss, already divided by the mean's denominator


def prepare_targets(
    batch_shape: torch.Size,
    num_classes: int,
    dtype: torch.dtype,
    target: Tensor,
    alpha: AlphaLike,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    validate: bool,
) -> RowTargets:
    """Check target and alpha values and turn them into per-row data in the compute ``dtype``.

    Shared by every loss over class logits ``batch_shape + (C,)``, materialised or not (the
    fused linear loss). The target's type and shape were checked by the caller.
    """
    eager_checks = validate and check.value_checks_allowed()
    alpha_input = alpha
    check.check_alpha(alpha, batch_shape)
    if isinstance(alpha, Tensor):
        if eager_checks:
            check.check_alpha_values(alpha)
            if alpha.dim() == 0 and alpha.device.type == "cpu" and not alpha.requires_grad:
                # A module's alpha buffer: on the CPU reading it is free, and a Python float
                # keeps the eager kernels on scalar arithmetic.
                alpha = float(alpha)
    elif not isinstance(alpha, torch.SymFloat):
        alpha = float(alpha)
    index, counted, invalid = _safe_target(num_classes, target, ignore_index, eager_checks)
    one_hot = target.is_floating_point()

    if weight is None:
        row_weight = counted.to(dtype)
    else:
        row_weight = torch.where(counted, weight.to(dtype)[index], 0.0)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(dtype).expand(batch_shape).reshape(-1)
        if not eager_checks:
            alpha_bad = ~((alpha > 0) & (alpha < 1)).reshape(batch_shape)
            invalid = alpha_bad if invalid is None else invalid | alpha_bad
    if invalid is not None:
        # Where values could not be checked in Python, a bad position poisons the result with
        # NaN instead of giving a silently wrong number; under torch.compile it also raises.
        if validate and torch.compiler.is_compiling() and not check.functorch_active():
            raise_if_invalid(
                invalid,
                _graph_checks(target, alpha_input),
                num_classes,
                ignore_index,
                LABEL_RELAXATION_MESSAGE,
            )
        row_weight = torch.where(invalid, torch.nan, row_weight)
    if reduction == "mean":
        # nn.CrossEntropyLoss: index targets divide by the summed weight of counted positions,
        # one-hot (probability) targets by the number of positions.
        if one_hot:
            # Counted as a tensor: a Python number would specialise compiled graphs on N.
            denominator = torch.ones_like(row_weight).sum().clamp_min(1)
        else:
            total = row_weight.sum()
            # An all-ignored batch gives 0 (with zero gradient) rather than CE's 0/0 = nan.
            denominator = torch.where(total != 0, total, torch.ones_like(total))
        row_weight = row_weight / denominator
    return RowTargets(index.reshape(-1), alpha, row_weight.reshape(-1))


def _graph_checks(target: Tensor, alpha: AlphaLike) -> list[tuple[str, Tensor]]:
    """The eager checks that explain a bad position, in the order eager mode runs them."""
    checks = [("alpha", alpha)] if isinstance(alpha, Tensor) else []
    checks.append(("one_hot" if target.is_floating_point() else "target", target))
    return checks


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor: possible once ``torch.distributed.tensor`` is loaded."""
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    return dtensor_module is not None and isinstance(tensor, dtensor_module.DTensor)


def _is_dual(tensor: Tensor) -> bool:
    """Whether ``tensor`` carries a forward-mode AD tangent."""
    if getattr(torch.autograd.forward_ad, "_current_level", 0) < 0:
        return False  # no dual level entered: no tangent anywhere (and no unpacking cost)
    dual = torch.autograd.forward_ad.unpack_dual(tensor)  # type: ignore[no-untyped-call]
    return dual.tangent is not None


def check_implementation(implementation: str) -> None:
    """Raise ``ValueError`` for an unknown ``implementation``."""
    # A literal, not a module-level tuple: under torch.compile each global read is guarded on
    # every call of the compiled code.
    choices = ("auto", "fused", "reference")
    if implementation not in choices:
        raise ValueError(f"implementation must be one of {choices}, got {implementation!r}")


def is_transformed(logits: Tensor) -> bool:
    """Whether this call is traced by torch.compile, a torch.func transform or forward AD."""
    return torch.compiler.is_compiling() or check.functorch_active() or _is_dual(logits)


def _needs_other_grad(alpha: AlphaLike, weight: Tensor | None) -> bool:
    """Whether alpha or the class weights need a gradient (the pure formulation's job)."""
    alpha_grad = isinstance(alpha, Tensor) and alpha.requires_grad
    return alpha_grad or (weight is not None and weight.requires_grad)


def _compiled_kernel_applies(
    logits: Tensor, alpha: AlphaLike, weight: Tensor | None, implementation: str
) -> bool:
    """Under ``torch.compile`` alone: the closed form with its gradient written out.

    See :mod:`label_relaxation._impl.compiled`; transforms and second derivatives need the pure one.
    """
    return (
        implementation == "auto"
        and torch.compiler.is_compiling()
        and not check.functorch_active()
        and not _is_dual(logits)
        and not _needs_other_grad(alpha, weight)
    )


def _compiled_loss(
    logits: Tensor,
    target: Tensor,
    alpha: AlphaLike,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    validate: bool,
) -> Tensor:
    """The loss under ``torch.compile``, traced into the graph without Dynamo stepping through it.

    Dynamo guards every function and module attribute it steps through and checks those guards
    on every call of the compiled code: 165 guards at 64x10 when it stepped through this body,
    106 now, and a compiled 64x10 forward took 119-146 against 142-157 µs (2-core AMD EPYC,
    torch 2.15, docs/performance.md). Dynamo still guards the Python values passed in
    (``alpha`` as a constant float, ``ignore_index``, ``reduction``). The arguments were
    checked on their metadata by the caller, where Dynamo traces the raise itself (an exception
    raised in here can surface as Dynamo's ``Unsupported``); bad values raise through the
    graph's check (:mod:`label_relaxation._impl.graph_checks`).
    """
    rows = _prepare(logits, target, alpha, weight, ignore_index, reduction, validate)
    loss_rows = compiled_rows(rows.logits, rows.target, rows.alpha, rows.row_weight)
    return loss_rows.reshape(logits.shape[:-1]) if reduction == "none" else loss_rows.sum()


# torch.compiler.nonstrict_trace, applied when torch.compile loads Dynamo (see dynamo_marks).
nonstrict_trace_on_import(globals(), "_compiled_loss")


def _use_fused(rows: _Rows, weight: Tensor | None, implementation: str) -> bool:
    """Pick the fused eager path where it is valid, else the pure formulation."""
    if implementation == "reference":
        return False
    transformed = is_transformed(rows.logits)
    if implementation == "fused" and transformed:
        raise RuntimeError(
            "implementation='fused' runs in plain eager mode only; under torch.compile, "
            "torch.func transforms or forward-mode AD use implementation='auto' or 'reference'"
        )
    return not transformed and not _needs_other_grad(rows.alpha, weight)


def _small_applies(
    logits: Tensor, target: Tensor, weight: Tensor | None, inplace: bool, implementation: str
) -> bool:
    """Whether a call may take the small-input kernel (decided on metadata only).

    The transform test comes first: under ``torch.compile`` with dynamic shapes a size test
    would guard the graph on the size bound, and a batch across it would recompile.
    """
    return (
        not is_transformed(logits)
        and implementation != "reference"
        and not inplace
        and _small.size_fits(logits)
        and logits.is_cpu  # a torch.device object costs more than the whole check
        and not target.is_floating_point()
        and (weight is None or not weight.requires_grad)
    )


def _plain_small_call(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    reduction: str,
    inplace: bool,
    implementation: str,
) -> bool:
    """Whether the call is the common one, which passes every metadata check below.

    Plain tensors, ``(N, C)`` floating logits with ``C >= 2``, ``(N,)`` int64 class indices,
    no class weights, default options, and what :func:`_small_applies` asks of a call that
    takes the small-input path (CPU, not traced, a size it takes).

    One expression instead of the general checks below (each a function call that raises where
    this returns ``False``, and the general path then gives the error): a forward at 64x10
    took 3-5 µs less than through those calls, 46-47 against 49-50 µs (2-core AMD EPYC, torch
    2.15, two invocations of ``bench/small_batches.py --eager``). ``type(...) is Tensor``
    leaves subclasses (DTensor) to the general path.
    """
    return (
        type(logits) is Tensor
        and type(target) is Tensor
        and weight is None
        and implementation == "auto"
        and (reduction == "mean" or reduction == "sum" or reduction == "none")
        and logits.dim() == 2
        and target.dim() == 1
        and logits.shape[0] == target.shape[0]
        and logits.shape[1] >= 2
        and target.dtype == torch.int64
        and logits.is_floating_point()
        and _small_applies(logits, target, weight, inplace, implementation)
    )


def label_relaxation_loss(
    logits: Tensor,
    target: Tensor,
    alpha: float | Tensor = 0.1,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    inplace: bool = False,
    implementation: Implementation = "auto",
    validate: bool = True,
) -> Tensor:
    r"""Label relaxation loss (Lienen & Hüllermeier, AAAI 2021) of unnormalised logits.

    Each position's target is relaxed to the credal set of all distributions that give at
    least ``1 - alpha`` to the observed class. The loss is 0 inside that set, and otherwise the
    KL divergence from the set's nearest member ``q`` to the prediction ``p = softmax(logits)``:

    .. math::

        \ell = (1-\alpha)\log\frac{1-\alpha}{p_y} + \alpha\log\frac{\alpha}{1-p_y}
        \quad\text{if } p_y < 1-\alpha, \text{ else } 0,

    with gradient ``p - q``, where ``q_y = 1 - alpha`` and ``q_k = alpha·p_k/(1 - p_y)``.

    Args:
        logits: Unnormalised scores, class dimension last. Any floating dtype; float16 and
            bfloat16 are computed in float32. A ``DTensor`` sharded on the class dimension
            (tensor parallelism) is reduced across its ranks without gathering it, and the
            result is a replicated ``DTensor`` (see
            :func:`label_relaxation.distributed.vocab_parallel_label_relaxation_loss`;
            ``inplace`` and ``implementation`` do not apply).
        target: Class indices (any integer dtype) of shape ``logits.shape[:-1]``, or an exactly
            one-hot floating tensor of the logits' shape.
        alpha: Relaxation in the open interval (0, 1): a float, or a tensor broadcastable to
            ``logits.shape[:-1]`` (per-position alpha).
        weight: Optional class weights of shape ``(C,)``, as in ``nn.CrossEntropyLoss``: each
            position's loss is multiplied by ``weight[y]``.
        ignore_index: Index targets equal to this value contribute no loss and no gradient.
        reduction: ``"none"``, ``"mean"`` (divided by the summed weight of counted positions;
            by the number of positions for one-hot targets, as in ``nn.CrossEntropyLoss``; an
            all-ignored batch gives 0) or ``"sum"``.
        inplace: Opt-in for callers who do not need ``logits`` afterwards: the gradient is
            written into the logits' own storage, saving a full-size buffer. Refused where that
            would corrupt another gradient; ignored where the pure formulation runs.
        implementation: ``"auto"`` (fused in plain eager mode; under ``torch.compile`` the
            closed form with its gradient written out, first order only; the pure formulation
            under ``torch.func`` transforms and forward-mode AD), ``"fused"`` or
            ``"reference"`` (pure formulation, differentiable to any order).
        validate: Check target and alpha values. In eager mode a bad value raises at once
            (this reads the values, which syncs a CUDA device); with ``validate=False``, and
            always under ``torch.func`` transforms, bad positions give NaN instead. Under
            ``torch.compile`` a bad value raises ``RuntimeError`` when the graph runs.

    Returns:
        The reduced loss (0-d), or with ``reduction="none"`` one loss per position. The loss is
        float64 for float64 logits and float32 otherwise.

    Raises:
        TypeError: ``logits``, ``target``, ``alpha`` or ``weight`` has an unsupported type or dtype.
        ValueError: A shape does not match, ``alpha`` lies outside (0, 1), a floating target is
            not exactly one-hot, ``reduction`` or ``implementation`` is unknown, there are fewer
            than 2 classes, or ``inplace`` would overwrite logits something else still needs.
        IndexError: A class index lies outside ``[0, C)`` and is not ``ignore_index``.

    Shape:
        - logits: ``(..., C)``, including a single row ``(C,)`` and ``(batch, seq, vocab)``.
        - target: ``(...)`` of class indices, or ``(..., C)`` one-hot.
        - output: ``()``, or ``(...)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from label_relaxation import label_relaxation_loss
        >>> logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
        >>> target = torch.tensor([0, 1])
        >>> label_relaxation_loss(logits, target, alpha=0.1, reduction="none")
        tensor([0.0000, 0.2570], grad_fn=<...>)
        >>> label_relaxation_loss(logits, target, alpha=0.1).backward()
        >>> logits.grad[0]  # the first row is inside the credal set
        tensor([0., 0., 0.])
    """
    small = _plain_small_call(logits, target, weight, reduction, inplace, implementation)
    if not small:
        check_implementation(implementation)
        if is_dtensor(logits):
            from label_relaxation.distributed import dtensor_label_relaxation_loss

            return dtensor_label_relaxation_loss(  # type: ignore[no-any-return]
                logits,
                target,
                alpha,
                weight=weight,
                ignore_index=ignore_index,
                reduction=reduction,
                validate=validate,
            )
        num_classes = check.check_logits(logits)
        check.check_reduction(reduction)
        check.check_weight(weight, num_classes)
        small = check.check_target_kind(target, logits) and _small_applies(
            logits, target, weight, inplace, implementation
        )
    if small:
        loss = _small.small_call(logits, target, alpha, weight, ignore_index, reduction, validate)
        if loss is not None:
            return loss
    if _compiled_kernel_applies(logits, alpha, weight, implementation):
        # Whatever raises on metadata raises here, where Dynamo traces; the traced body below
        # raises for bad values only, at run time.
        check.check_alpha(alpha, logits.shape[:-1])
        return _compiled_loss(logits, target, alpha, weight, ignore_index, reduction, validate)
    rows = _prepare(logits, target, alpha, weight, ignore_index, reduction, validate)
    batch_shape = logits.shape[:-1]
    reduce = reduction != "none"
    if _use_fused(rows, weight, implementation):
        if inplace and needs_gradient(rows.logits):
            check_inplace_allowed(logits)

        def kernel(grad_out: Tensor | None) -> Tensor:
            return fused_rows(rows.logits, rows.target, rows.alpha, rows.row_weight, grad_out)

        loss = apply_fused(rows.logits, kernel, reduce, inplace)
        return loss if reduce else loss.reshape(batch_shape)
    counted = rows.row_weight != 0
    zero = torch.zeros((), dtype=rows.row_weight.dtype, device=rows.row_weight.device)
    # Rows that do not count (ignored, weight 0) are neutralised before any arithmetic, so that
    # garbage there (-inf rows, NaN) cannot leak into the gradient through a where().
    compute_logits = torch.where(counted.unsqueeze(-1), rows.logits.to(zero.dtype), zero)
    unweighted = reference_rows(compute_logits, rows.target, rows.alpha)
    loss_rows = torch.where(counted, rows.row_weight * unweighted, zero)
    return loss_rows.sum() if reduce else loss_rows.reshape(batch_shape)
