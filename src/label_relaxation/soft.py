r"""Label relaxation for any target distribution: soft, label-smoothed, mixup and CutMix targets.

For a target distribution ``t`` the credal set is ``S = {q in the simplex : q_k >= (1-α)·t_k}``.
For one-hot ``t`` this is plain label relaxation; for ``t = λ·e_i + (1-λ)·e_j`` it is the mixup
rule ``q_i >= λ(1-α)``, ``q_j >= (1-λ)(1-α)``. The loss is ``min_{q in S} KL(q ‖ p)``.

With ``c = (1-α)·t`` the KKT conditions give ``q_k = max(c_k, τ·p_k)``, ``τ`` chosen so that
``Σ q = 1`` (water-filling; see the docs for the derivation). With classes sorted by the ratio
``ρ_k = c_k/p_k``, the classes that are not clamped at ``c_k`` form a prefix, and for a prefix
``F`` of length ``j``

.. math:: τ_j = \frac{1 - \sum_{k \notin F} c_k}{\sum_{k \in F} p_k}
              = \frac{α + (1-α)\sum_{k \in F} t_k}{\sum_{k \in F} p_k},

so all candidates come from two cumulative sums after one sort: no iterative solver, no loop.
The right prefix is the longest whose last ratio lies below its ``τ``. The loss is then
``m_F·log τ + Σ_{k ∉ F} c_k·(log c_k - log p_k)`` with ``m_F = α + (1-α)Σ_F t_k``, and its
gradient with respect to the logits is ``p - q``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from label_relaxation._impl import validation as check
from label_relaxation._impl.fused import apply_fused, compute_dtype
from label_relaxation._impl.fused_mixup import fused_mixup_rows
from label_relaxation._impl.graph_checks import MIXUP_MESSAGE, SOFT_MESSAGE, raise_if_invalid
from label_relaxation._impl.validation import Reduction
from label_relaxation.functional import Implementation, check_implementation, is_transformed


def _check_soft_target(target: object, logits: Tensor, validate: bool) -> Tensor:
    """Check type and shape; raise for bad rows in eager mode; return the bad-row mask."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if not target.is_floating_point():
        raise TypeError(
            f"target must be a floating tensor of class probabilities, got dtype {target.dtype}"
        )
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(
            f"target must have the logits' shape {tuple(logits.shape)}, "
            f"got shape {tuple(target.shape)}"
        )
    invalid = check.soft_target_invalid_rows(target)
    if validate and check.value_checks_allowed():
        check.check_soft_target_values(target, invalid)
    return invalid


def soft_relaxation_rows(logits: Tensor, target: Tensor, alpha: float | Tensor) -> Tensor:
    """Unweighted loss per row for logits ``(..., C)`` and target distributions ``(..., C)``.

    Both in the compute dtype; a tensor ``alpha`` broadcasts to ``logits.shape[:-1]``.
    """
    if isinstance(alpha, Tensor):
        alpha = alpha.unsqueeze(-1)
    log_p = torch.log_softmax(logits, dim=-1)
    floor = (1 - alpha) * target  # c_k
    positive = floor > 0
    ones = torch.ones_like(floor)
    log_floor = torch.where(positive, floor, ones).log()
    # log ρ_k; classes with c_k = 0 can never be clamped: -inf sorts them first.
    log_ratio = torch.where(positive, log_floor - log_p, float("-inf"))
    sorted_log_ratio, order = torch.sort(log_ratio, dim=-1)
    sorted_log_p = log_p.gather(-1, order)
    sorted_target = target.gather(-1, order)
    # Both cumulative sums add non-negative terms: no cancellation anywhere.
    log_free_mass = torch.logcumsumexp(sorted_log_p, dim=-1)
    kept_mass = alpha + (1 - alpha) * torch.cumsum(sorted_target, dim=-1)
    log_tau = kept_mass.log() - log_free_mass
    # The solution's free set is the longest prefix whose last ratio lies below its tau.
    feasible = sorted_log_ratio < log_tau
    prefix = feasible.sum(-1, keepdim=True).clamp_min(1) - 1
    log_tau_star = log_tau.gather(-1, prefix)
    mass_star = kept_mass.gather(-1, prefix)
    clamped = positive & (log_ratio >= log_tau_star)
    clamped_terms = torch.where(clamped, floor * (log_floor - log_p), torch.zeros_like(log_p))
    loss = mass_star.squeeze(-1) * log_tau_star.squeeze(-1) + clamped_terms.sum(-1)
    # Inside S (every p_k >= c_k) the minimiser is p itself: exactly 0, with zero gradient.
    inside = (~positive | (log_p >= log_floor)).all(-1)
    return torch.where(inside, torch.zeros_like(loss), loss)


def soft_label_relaxation_loss(
    logits: Tensor,
    target: Tensor,
    alpha: float | Tensor = 0.1,
    *,
    weight: Tensor | None = None,
    reduction: Reduction = "mean",
    validate: bool = True,
) -> Tensor:
    r"""Label relaxation against any target distribution (soft, smoothed, mixup, CutMix).

    The credal set is ``{q : q_k >= (1-alpha)·t_k}``; the loss is the KL divergence from its
    nearest member ``q_k = max((1-alpha)·t_k, τ·p_k)``, 0 inside the set, with gradient
    ``p - q``. For one-hot targets it equals :func:`label_relaxation_loss`.

    Args:
        logits: Unnormalised scores ``(..., C)``, class dimension last.
        target: Target distributions of the logits' shape: entries >= 0, rows summing to 1
            within ``max(1e-5, 4·eps)`` of the target's dtype (used as given, not rescaled).
        alpha: Relaxation in (0, 1): a float, or a tensor broadcastable to
            ``logits.shape[:-1]``.
        weight: Optional class weights ``(C,)``. A row's loss is multiplied by the expected
            weight of its target, ``Σ_k weight_k·t_k`` (``weight[y]`` for one-hot targets);
            ``"mean"`` divides by the number of rows, as ``nn.CrossEntropyLoss`` does for
            probability targets.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        validate: Check target rows and alpha values in eager mode (see
            :func:`label_relaxation_loss`); otherwise bad rows give NaN.

    Returns:
        The reduced loss, or one loss per row with ``reduction="none"``; float32 (float64 for
        float64 logits).

    Raises:
        TypeError: ``logits`` or ``target`` is not a floating tensor.
        ValueError: Shapes differ, a target row is negative or does not sum to 1, ``alpha``
            lies outside (0, 1), or ``reduction`` is unknown.

    Shape:
        - logits, target: ``(..., C)``.
        - output: ``()``, or ``(...)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from label_relaxation import soft_label_relaxation_loss
        >>> logits = torch.tensor([[0.0, 2.0, -1.0]])
        >>> smoothed = torch.tensor([[0.9, 0.05, 0.05]])  # a label-smoothed target
        >>> soft_label_relaxation_loss(logits, smoothed, alpha=0.1)
        tensor(1.3346)
    """
    num_classes = check.check_logits(logits)
    check.check_reduction(reduction)
    check.check_weight(weight, num_classes)
    invalid = _check_soft_target(target, logits, validate)
    dtype = compute_dtype(logits.dtype)
    batch_shape = logits.shape[:-1]
    eager_checks = validate and check.value_checks_allowed()
    if isinstance(alpha, Tensor):
        check.check_alpha_tensor(alpha, batch_shape)
        if eager_checks:
            check.check_alpha_values(alpha)
        alpha = alpha.to(dtype).expand(batch_shape)
        invalid = invalid | ~((alpha > 0) & (alpha < 1))
    else:
        check.check_alpha_float(alpha)
        alpha = float(alpha)
    if validate and torch.compiler.is_compiling() and not check.functorch_active():
        checks = [("soft_target", target)]
        if isinstance(alpha, Tensor):
            checks.append(("alpha", alpha))
        raise_if_invalid(
            invalid,
            checks,
            num_classes,
            None,
            SOFT_MESSAGE,
        )
    target_c = target.to(dtype)
    # Bad rows are neutralised before the arithmetic and poisoned with NaN after it.
    uniform = torch.full_like(target_c, 1.0 / num_classes)
    safe_target = torch.where(invalid.unsqueeze(-1), uniform, target_c)
    rows = soft_relaxation_rows(logits.to(dtype), safe_target, alpha)
    if weight is not None:
        rows = rows * (safe_target * weight.to(dtype)).sum(-1)
    # A factor, not a where(): the gradient of a bad row must be NaN too, not a silent zero
    # (per-sample gradients under torch.func would otherwise train on it unnoticed).
    rows = rows * torch.where(invalid, torch.nan, 1.0)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / max(rows.numel(), 1) if reduction == "mean" else total


def mixup_label_relaxation_loss(
    logits: Tensor,
    target_a: Tensor,
    target_b: Tensor,
    lam: float | Tensor,
    alpha: float | Tensor = 0.1,
    *,
    weight: Tensor | None = None,
    reduction: Reduction = "mean",
    implementation: Implementation = "auto",
    validate: bool = True,
) -> Tensor:
    """Label relaxation for mixup/CutMix: the target ``lam·e_a + (1-lam)·e_b``.

    The credal set requires ``q_a >= lam·(1-alpha)`` and ``q_b >= (1-lam)·(1-alpha)``; equal to
    :func:`soft_label_relaxation_loss` on the mixed one-hot targets.

    Args:
        logits: Unnormalised scores ``(..., C)``.
        target_a: Class indices of the first sample, shape ``logits.shape[:-1]``.
        target_b: Class indices of the second sample, same shape.
        lam: Mixing weight in [0, 1] of ``target_a``: a float, or a tensor broadcastable to
            ``logits.shape[:-1]`` (per-sample, as in CutMix).
        alpha: Relaxation in (0, 1).
        weight: Optional class weights ``(C,)`` (see :func:`soft_label_relaxation_loss`).
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        implementation: ``"auto"`` (a fused kernel for the two classes in plain eager mode,
            the general pure formulation under ``torch.compile``, ``torch.func`` and
            forward-mode AD), ``"fused"`` or ``"reference"``.
        validate: Check index ranges and ``lam`` in eager mode.

    Returns:
        As :func:`soft_label_relaxation_loss`.

    Raises:
        ValueError: ``lam`` outside [0, 1], shapes that do not match, or any error of
            :func:`soft_label_relaxation_loss`.
        IndexError: A class index outside ``[0, C)``.

    Shape:
        - logits: ``(..., C)``; target_a, target_b: ``(...)``.
        - output: ``()``, or ``(...)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from label_relaxation import mixup_label_relaxation_loss
        >>> logits = torch.tensor([[1.0, 1.0, -2.0]])
        >>> mixup_label_relaxation_loss(logits, torch.tensor([0]), torch.tensor([1]), lam=0.5)
        tensor(0.)
    """
    num_classes = check.check_logits(logits)
    batch_shape = logits.shape[:-1]
    for name, indices in (("target_a", target_a), ("target_b", target_b)):
        if (
            not isinstance(indices, Tensor)
            or indices.is_floating_point()
            or indices.dtype == torch.bool
        ):
            raise TypeError(f"{name} must be a tensor of integer class indices")
        if tuple(indices.shape) != tuple(batch_shape):
            raise ValueError(
                f"{name} must have shape logits.shape[:-1] = {tuple(batch_shape)}, "
                f"got shape {tuple(indices.shape)}"
            )
    eager_checks = validate and check.value_checks_allowed()
    if eager_checks:
        check.check_index_values(target_a, num_classes, None, name="target_a")
        check.check_index_values(target_b, num_classes, None, name="target_b")
    if isinstance(alpha, Tensor):
        check.check_alpha_tensor(alpha, batch_shape)
        if eager_checks:
            check.check_alpha_values(alpha)
    else:
        check.check_alpha_float(alpha)
    dtype = compute_dtype(logits.dtype)
    if isinstance(lam, Tensor):
        check.check_alpha_tensor(lam, batch_shape, name="lam")
        if eager_checks:
            check.check_lam_values(lam)
        lam_t = lam.to(dtype).expand(batch_shape).unsqueeze(-1)
    else:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be a number or tensor in [0, 1], got {lam!r}")
        lam_t = torch.tensor(float(lam), dtype=dtype, device=logits.device)
    if _use_fused_mixup(logits, alpha, lam, weight, implementation, eager_checks):
        lam_rows = lam_t.squeeze(-1) if lam_t.dim() > 0 else lam_t
        return _fused_mixup(
            logits, target_a, target_b, lam_rows, alpha, weight=weight, reduction=reduction
        )
    classes = torch.arange(num_classes, device=logits.device)
    safe_a = target_a.clamp(0, num_classes - 1).unsqueeze(-1)
    safe_b = target_b.clamp(0, num_classes - 1).unsqueeze(-1)
    mixed = lam_t * (classes == safe_a).to(dtype) + (1 - lam_t) * (classes == safe_b).to(dtype)
    bad_index = ((target_a < 0) | (target_a >= num_classes)) | (
        (target_b < 0) | (target_b >= num_classes)
    )
    checked_here = validate and torch.compiler.is_compiling() and not check.functorch_active()
    if checked_here:
        _raise_if_bad_mixup(bad_index, target_a, target_b, lam, alpha, num_classes)
    # Out-of-range indices (unchecked modes) become a non-distribution row, hence NaN.
    mixed = torch.where(bad_index.unsqueeze(-1), torch.full_like(mixed, -1.0), mixed)
    # Checked above under torch.compile, with the arguments' own names; the soft loss still
    # turns the rows flagged there into NaN.
    return soft_label_relaxation_loss(
        logits,
        mixed,
        alpha,
        weight=weight,
        reduction=reduction,
        validate=validate and not checked_here,
    )


def _raise_if_bad_mixup(
    bad_index: Tensor,
    target_a: Tensor,
    target_b: Tensor,
    lam: float | Tensor,
    alpha: float | Tensor,
    num_classes: int,
) -> None:
    """Under torch.compile: raise as eager mode would for bad mixup arguments."""
    invalid = bad_index
    checks: list[tuple[str, Tensor]] = [("target_a", target_a), ("target_b", target_b)]
    if isinstance(lam, Tensor):
        invalid = invalid | ~((lam >= 0) & (lam <= 1))
        checks.append(("lam", lam))
    if isinstance(alpha, Tensor):
        invalid = invalid | ~((alpha > 0) & (alpha < 1))
        checks.append(("alpha", alpha))
    raise_if_invalid(
        invalid,
        checks,
        num_classes,
        None,
        MIXUP_MESSAGE,
    )


def _use_fused_mixup(
    logits: Tensor,
    alpha: float | Tensor,
    lam: float | Tensor,
    weight: Tensor | None,
    implementation: str,
    eager_checks: bool,
) -> bool:
    """The fused two-class kernel in plain eager mode, when every value was checked."""
    check_implementation(implementation)
    if implementation == "reference":
        return False
    transformed = is_transformed(logits)
    if implementation == "fused" and transformed:
        raise RuntimeError(
            "implementation='fused' runs in plain eager mode only; under torch.compile, "
            "torch.func transforms or forward-mode AD use implementation='auto' or 'reference'"
        )
    differentiable = [t for t in (alpha, lam, weight) if isinstance(t, Tensor)]
    return eager_checks and not transformed and not any(t.requires_grad for t in differentiable)


def _fused_mixup(
    logits: Tensor,
    target_a: Tensor,
    target_b: Tensor,
    lam: Tensor,
    alpha: float | Tensor,
    *,
    weight: Tensor | None,
    reduction: Reduction,
) -> Tensor:
    """Mixup loss through the fused kernel (inputs already validated)."""
    num_classes = logits.shape[-1]
    batch_shape = logits.shape[:-1]
    dtype = compute_dtype(logits.dtype)
    rows = logits.reshape(-1, num_classes)
    index_a = target_a.reshape(-1).long()
    index_b = target_b.reshape(-1).long()
    lam_rows = lam.expand(batch_shape).reshape(-1)
    same = index_a == index_b
    if isinstance(alpha, Tensor):
        alpha = alpha.to(dtype).expand(batch_shape).reshape(-1)
    relaxed = 1 - alpha
    # a == b is a one-hot target: all of 1 - alpha on a, no bound for b.
    c_a = relaxed * torch.where(same, 1.0, lam_rows)
    c_b = relaxed * torch.where(same, 0.0, 1 - lam_rows)
    if weight is None:
        row_weight = torch.ones_like(lam_rows)
    else:
        w = weight.to(dtype)
        row_weight = lam_rows * w[index_a] + (1 - lam_rows) * w[index_b]
    if reduction == "mean":
        row_weight = row_weight / max(row_weight.numel(), 1)

    def kernel(grad_out: Tensor | None) -> Tensor:
        return fused_mixup_rows(rows, index_a, index_b, c_a, c_b, alpha, row_weight, grad_out)

    loss = apply_fused(rows, kernel, reduction != "none", inplace=False)
    return loss if reduction != "none" else loss.reshape(batch_shape)
