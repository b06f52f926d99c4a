"""The path ``torch.compile`` traces: the closed form with its gradient ``w·(p - q)`` written out.

Left to autograd, the pure formulation (:mod:`label_relaxation._reference`) makes Inductor carry
the target logit through a second masked sum and neutralise ignored rows element by element in
the forward pass, and the backward pass differentiates all of it. Here the forward pass reads
the target logit with a gather, sums only the non-target mass with a mask (never ``1 - p_y``),
and keeps per row the two numbers the gradient needs: ``w·(1 - alpha/r)/total`` for the
off-target entries and ``w·(alpha - r)`` for the target. The backward pass recomputes
``exp(z - m)`` in one fused pass, as compiled cross-entropy does.

First-order only (``once_differentiable``); ``torch.func`` transforms, forward-mode AD, a
gradient for alpha or the class weights, and ``implementation="reference"`` keep the pure
formulation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from label_relaxation._closed_form import (
    LOG2_E,
    AlphaLike,
    exp_base,
    log_alpha_terms,
    log_target_probability,
    relaxation_loss,
)


def _shifted_exp(logits: Tensor, shift: Tensor) -> Tensor:
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
    shift = logits.amax(-1, keepdim=True).to(dtype)
    # Rows of only -inf get shift 0; a +inf or NaN maximum stays and gives NaN.
    shift = torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift)
    index = target.unsqueeze(-1)
    target_shifted = (logits.gather(-1, index).to(dtype) - shift).squeeze(-1)
    mass = _shifted_exp(logits, shift)
    rest = torch.where(is_target_mask(logits, target), torch.zeros_like(mass), mass).sum(-1)
    return coefficients_from_statistics(shift, rest, target_shifted, alpha, row_weight)


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
) -> Tensor:
    """``g·w·(p - q)`` of ``logits`` ``(N, C)`` in the compute dtype, ``g`` = ``row_scale`` or 1.

    ``p_k·w·(1 - alpha/r)`` off the target and ``w·(alpha - r)`` at it, in one fused pass that
    recomputes ``exp(z - m)``.
    """
    off_target, on_target = coefficients.off_target, coefficients.on_target
    if row_scale is not None:
        off_target, on_target = off_target * row_scale, on_target * row_scale
    scaled = _shifted_exp(logits, coefficients.shift) * off_target.unsqueeze(-1)
    grad = torch.where(is_target_mask(logits, target), on_target.unsqueeze(-1), scaled)
    return torch.where(coefficients.keep.unsqueeze(-1), grad, torch.zeros_like(grad))


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
