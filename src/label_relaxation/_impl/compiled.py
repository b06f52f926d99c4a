"""The path ``torch.compile`` traces: the closed form with its gradient ``w·(p - q)`` written out.

Left to autograd, the pure formulation (:mod:`label_relaxation._impl.reference`) makes Inductor
carry the target logit through a second masked sum and neutralise ignored rows element by
element in the forward pass, and the backward pass differentiates all of it. Here the forward
pass reads the target logit with a gather, sums the mass below the row maximum and counts the
maxima (compares with the maximum's value, never a class-index vector per logit), from which the
non-target mass follows without ``1 - p_y``, and keeps per row the two numbers the gradient
needs: ``w·(1 - alpha/r)/total`` for the off-target entries and ``w·(alpha - r)`` for the
target. The backward pass recomputes ``exp(z - m)`` in one fused pass, as compiled cross-entropy
does, and scatters the target entries afterwards.

First-order only (``once_differentiable``); ``torch.func`` transforms, forward-mode AD, a
gradient for alpha or the class weights, and ``implementation="reference"`` keep the pure
formulation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from label_relaxation._impl.closed_form import (
    LOG2_E,
    AlphaLike,
    exp_base,
    log_alpha_terms,
    log_target_probability,
    relaxation_loss,
)

# Rows of fewer classes exclude the target by class index rather than by value: forward at
# 65536x10 compiled 915-957 against 984-993 µs, forward+backward 2.77-2.97 against 3.44-3.46 ms
# (131072x32: 7.9-8.1 against 9.0 ms; 2-core Xeon, `label-relaxation bench`, two runs each).
VALUE_COMPARE_MIN_CLASSES = 64


def shifted_exp(logits: Tensor, shift: Tensor) -> Tensor:
    """``exp(z - m)`` in the compute dtype, as exp2 where that is the cheaper exponential."""
    shifted = logits.to(shift.dtype) - shift
    if exp_base(logits.device).two:
        return torch.exp2(shifted * LOG2_E)
    return shifted.exp()


class RowCoefficients(NamedTuple):
    """What one pass over a block of logits leaves for the loss and its gradient, per row."""

    loss: Tensor  # (N,) weighted loss rows
    shift: Tensor  # (N, 1) the row maximum (0 for rows of only -inf), compute dtype
    keep: Tensor  # (N,) bool, rows that count (weight != 0)
    off_target: Tensor  # (N,) w·(1 - alpha/r)/total: multiplies exp(z_k - m) off the target
    on_target: Tensor  # (N,) w·(alpha - r): the target's gradient entry


def row_coefficients(
    logits: Tensor, target: Tensor, alpha: AlphaLike, row_weight: Tensor
) -> RowCoefficients:
    """Loss rows and gradient coefficients of ``logits`` ``(N, C)``, in traceable operations.

    ``target`` ``(N,)`` holds valid indices, ``row_weight`` ``(N,)`` (0: ignored, NaN: bad).
    """
    dtype = row_weight.dtype
    row_max = logits.amax(-1, keepdim=True)
    shift = _finite_shift(row_max.to(dtype))
    target_logit = logits.gather(-1, target.unsqueeze(-1))
    target_shifted = (target_logit.to(dtype) - shift).squeeze(-1)
    # Wide rows: the classes at the row maximum are told apart by value, not by index: one
    # compare with the row's maximum per logit, where a class-index compare costs Inductor an
    # index vector per 16 logits (this pass took 64.5 against 46 ms at 4096x32000 on
    # AVX-512). A row of only -inf has no maximum to match (compared with NaN). Narrow rows
    # (VALUE_COMPARE_MIN_CLASSES) compare indices instead: there the two accumulators of the
    # value compare (mass below the maximum, count of maxima) cost more than the index vector.
    # The exponent takes the row maximum clamped to the lowest finite value, not `shift`
    # itself: a saved `shift` is realised as its own buffer, and an exponent pass that reads
    # it made Inductor split the row loop (max, then masses: the row read twice while it is
    # in cache) into two loops over all rows (the second read from memory; forward at
    # 4096x32000 with a gradient 95 against 44 ms). Both agree where the maximum is finite;
    # a row of only -inf has no mass either way, and a +inf maximum's NaN comes through
    # `target_shifted`.
    mass = shifted_exp(logits, row_max.to(dtype).clamp_min(torch.finfo(dtype).min))
    if logits.shape[-1] < VALUE_COMPARE_MIN_CLASSES:
        # Narrow rows: the target told apart by class index, one accumulator per row.
        rest = torch.where(is_target_mask(logits, target), torch.zeros_like(mass), mass).sum(-1)
    else:
        rest = _rest_by_value(logits, mass, row_max, target_logit, target_shifted)
    return coefficients_from_statistics(shift, rest, target_shifted, alpha, row_weight)


def _rest_by_value(
    logits: Tensor, mass: Tensor, row_max: Tensor, target_logit: Tensor, target_shifted: Tensor
) -> Tensor:
    """The non-target mass ``(N,)`` of wide rows, the classes at the maximum told by value.

    ``mass`` is ``exp(z - m)`` in the compute dtype, ``row_max`` and ``target_logit``
    ``(N, 1)`` in the logits' dtype, ``target_shifted`` ``(N,)``.
    """
    at_max = logits == torch.where(torch.isneginf(row_max), torch.nan, row_max)
    below_max = torch.where(at_max, torch.zeros_like(mass), mass).sum(-1)
    ties = at_max.to(mass.dtype).sum(-1)
    # Where the target is a maximum, the rest is the mass below the maximum plus the other
    # maxima (exactly 1 each): summed directly, never 1 - p_y. Elsewhere p_y <= 1/2, and
    # subtracting p'_y from the total loses at most one bit.
    target_is_max = (target_logit == row_max).squeeze(-1)
    return torch.where(
        target_is_max, below_max + (ties - 1), (below_max + ties) - target_shifted.exp()
    )


def _finite_shift(row_max: Tensor) -> Tensor:
    """The row maximum as the exponent shift: 0 for rows of only -inf, NaN for a +inf maximum.

    A +inf maximum must give NaN (as it does through the shifted exponentials of the other
    classes); the value mask of :func:`row_coefficients` would otherwise skip the +inf class.
    """
    shift = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    return torch.where(torch.isposinf(shift), torch.full_like(shift, torch.nan), shift)


def coefficients_from_statistics(
    shift: Tensor, rest: Tensor, target_shifted: Tensor, alpha: AlphaLike, row_weight: Tensor
) -> RowCoefficients:
    """Loss rows and gradient coefficients from the row statistics of the closed form.

    ``shift`` ``(N, 1)``; ``rest`` (the non-target mass, summed directly) and ``target_shifted``
    (``z_y - m``) ``(N,)``. The target's mass is ``exp(target_shifted)``.
    """
    total = rest + target_shifted.exp()
    r = rest / total
    # Not `r > alpha`: that is False for NaN, and NaN logits must give NaN.
    active = ~(r <= alpha)
    log_total = total.log()
    log_r = torch.where(active, rest, total).log() - log_total
    log_p_target = log_target_probability(r, target_shifted, log_total)
    log_alpha, log1m_alpha = log_alpha_terms(alpha)
    loss = relaxation_loss(log_p_target, log_r, alpha, log_alpha, log1m_alpha)
    zero = torch.zeros_like(loss)
    # Ignored rows (weight 0) are exactly 0 whatever their logits hold; a NaN weight (an
    # unchecked bad value) makes the row NaN.
    keep = row_weight != 0
    return RowCoefficients(
        loss=torch.where(keep, row_weight * torch.where(active, loss, zero), zero),
        shift=shift,
        keep=keep,
        off_target=torch.where(
            keep, row_weight * torch.where(active, (1 - alpha / r) / total, zero), zero
        ),
        on_target=torch.where(keep, row_weight * torch.where(active, alpha - r, zero), zero),
    )


def is_target_mask(logits: Tensor, target: Tensor) -> Tensor:
    """``(N, C)`` mask of each row's target class (all False for a target of -1)."""
    # int32 indices: Inductor's vector compare then takes one register per 16 logits, not two.
    classes = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.int32)
    return classes == target.unsqueeze(-1).to(torch.int32)


def gradient_from_coefficients(
    logits: Tensor,
    target: Tensor,
    coefficients: RowCoefficients,
    row_scale: Tensor | None = None,
    held: Tensor | None = None,
) -> Tensor:
    """``g·w·(p - q)`` of ``logits`` ``(N, C)`` in the compute dtype, ``g`` = ``row_scale`` or 1.

    ``p_k·w·(1 - alpha/r)`` off the target, in one fused pass that recomputes ``exp(z - m)``;
    then ``w·(alpha - r)`` is scattered into each row's target entry. Placing it inside the
    pass would need a class-index compare per logit, which cost Inductor half as much again
    (125 against 83 ms for this pass at 4096x32000 on AVX-512). ``held`` (vocabulary-parallel
    shards) marks the rows whose ``target`` lies in this block; the others have no target entry
    here (``target`` holds any value there).
    """
    off_target, on_target = coefficients.off_target, coefficients.on_target
    if row_scale is not None:
        off_target, on_target = off_target * row_scale, on_target * row_scale
    scaled = shifted_exp(logits, coefficients.shift) * off_target.unsqueeze(-1)
    keep = coefficients.keep
    # Rows that do not count are exactly 0, whatever their logits or incoming gradient hold.
    grad = torch.where(keep.unsqueeze(-1), scaled, torch.zeros_like(scaled))
    on_target = torch.where(keep, on_target, torch.zeros_like(on_target))
    if held is None:
        index = target.unsqueeze(-1)
    else:
        index = torch.where(held, target, torch.zeros_like(target)).unsqueeze(-1)
        on_target = torch.where(held, on_target, grad.gather(-1, index).squeeze(-1))
    return grad.scatter(-1, index, on_target.unsqueeze(-1).to(grad.dtype))


class CompiledLoss(torch.autograd.Function):
    """Weighted loss rows of ``logits`` ``(N, C)``; backward writes ``g·w·(p - q)``."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, target: Tensor, alpha: AlphaLike, row_weight: Tensor
    ) -> Tensor:
        """``target`` ``(N,)`` valid indices, ``row_weight`` ``(N,)`` (0: ignored, NaN: bad)."""
        coefficients = row_coefficients(logits, target, alpha, row_weight)
        ctx.save_for_backward(
            logits,
            target,
            coefficients.shift,
            coefficients.keep,
            coefficients.off_target,
            coefficients.on_target,
        )
        return coefficients.loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        """``g·w·(p - q)``: ``p_k·w·(1 - alpha/r)`` off the target, ``w·(alpha - r)`` at it."""
        logits, target, shift, keep, off_target, on_target = ctx.saved_tensors
        coefficients = RowCoefficients(grad_rows, shift, keep, off_target, on_target)
        grad = gradient_from_coefficients(logits, target, coefficients, grad_rows)
        return grad.to(logits.dtype), None, None, None


def compiled_rows(logits: Tensor, target: Tensor, alpha: AlphaLike, row_weight: Tensor) -> Tensor:
    """Weighted loss per row through :class:`CompiledLoss` (see the module docstring)."""
    loss: Tensor = CompiledLoss.apply(logits, target, alpha, row_weight)
    return loss
