"""Pure-function formulation of the loss: differentiable by autograd to any order.

This path is made only of out-of-place, shape-static tensor operations (``where``, ``amax``,
``sum``, ``exp``/``exp2``, ``log``). It is what ``torch.func`` transforms (``vmap``, ``grad``,
``jvp``, ``jacfwd``, ``hessian``) run, the path for double backward and for gradients with
respect to alpha or the class weights, and what ``torch.compile`` traces for
``implementation="reference"`` (otherwise it traces :mod:`label_relaxation._impl.compiled`). Its
gradient is autograd's derivative of the closed form, which equals ``p - q`` (the projection is
the minimiser, so its own derivative drops out).
"""

from __future__ import annotations

import torch
from torch import Tensor

from label_relaxation._impl.closed_form import (
    LOG2_E,
    AlphaLike,
    exp_base,
    log_alpha_terms,
    log_target_probability,
    relaxation_loss,
)


def _exp(shifted: Tensor) -> Tensor:
    """``exp(shifted)``; under ``torch.compile``, where base 2 is cheaper, as ``exp2``.

    Inductor fuses the scaling ``shifted·log2(e)`` into the loop that computes the exponential;
    whether its exp2 beats its exp depends on the CPU (``ExpBase``). Run eagerly, the scaling
    would be one more full-size pass and buffer, which costs more than exp2 saves. Scaling the
    already shifted logits keeps the rounding at eps·|z - m|, as with exp.
    """
    if torch.compiler.is_compiling() and exp_base(shifted.device).two:
        return torch.exp2(shifted * LOG2_E)
    return shifted.exp()


def reference_rows(logits: Tensor, target: Tensor, alpha: AlphaLike) -> Tensor:
    """Unweighted loss per position of ``logits`` ``(..., C)`` for safe indices ``target``.

    ``logits`` must already be in the compute dtype (float32 or float64), ``target`` must hold
    valid indices only (ignored positions replaced by any valid class), and a tensor ``alpha``
    must broadcast to ``target``'s shape.
    """
    num_classes = logits.shape[-1]
    # The shift only conditions exp(); the loss is shift-invariant, so a detached shift keeps
    # every derivative exact. Rows of only -inf get shift 0 instead of -inf - -inf = nan.
    shift = logits.detach().amax(-1, keepdim=True)
    # A +inf or NaN maximum stays: such a row gives NaN, as in cross-entropy.
    shift = torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift)
    shifted = logits - shift
    exp_shifted = _exp(shifted)
    classes = torch.arange(num_classes, device=logits.device)
    is_target = classes == target.unsqueeze(-1)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    # where() rather than gather(): Inductor fuses both sums into the pass that reads the row,
    # and the gradient needs no zeros-then-scatter buffer.
    s_rest = torch.where(is_target, zero, exp_shifted).sum(-1)
    target_shifted = torch.where(is_target, shifted, zero).sum(-1)
    s_total = s_rest + target_shifted.exp()

    r = s_rest / s_total
    # Not `r > alpha`: that is False for NaN, and NaN logits must give NaN, as in cross-entropy.
    active = ~(r <= alpha)
    # Inactive rows (inside the credal set, including r == 0) take a neutral s_rest so that
    # log(0) never reaches the unselected branch of the final where().
    s_rest_safe = torch.where(active, s_rest, s_total)
    log_s_total = s_total.log()
    log_r = s_rest_safe.log() - log_s_total
    log_p_target = log_target_probability(r, target_shifted, log_s_total)
    log_alpha, log1m_alpha = log_alpha_terms(alpha)
    loss = relaxation_loss(log_p_target, log_r, alpha, log_alpha, log1m_alpha)
    return torch.where(active, loss, torch.zeros_like(loss))
