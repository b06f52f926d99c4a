"""Fused eager kernel for small inputs: loss and gradient in about twenty operator calls.

At classification sizes (a 64×10 batch, a few hundred thousand logits at most) a call costs
what its operator calls cost, a few microseconds each, not what its arithmetic costs. This
kernel therefore spends calls sparingly: one ``log_softmax`` gives ``log p`` (exact where
``p_y`` underflows), one ``exp`` gives ``p`` into the gradient buffer itself, the non-target
mass ``r = 1 - p_y`` is summed directly (never ``1 - p_y``), and every per-row quantity is a
handful of ``(N, 1)`` operations with the Python-float alpha folded into their constants.

The chunked kernel (:mod:`label_relaxation._fused`) takes over above :data:`SMALL_ELEMENTS`,
where passes over memory, not calls, set the cost.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from label_relaxation._fused import compute_dtype

# Up to 2^18 logits (1 MiB of float32) this kernel is faster than the chunked one on the CPU
# it was tuned on (bench: `label-relaxation bench --sweep`); above, the chunked kernel's single
# exp2 pass wins.
SMALL_ELEMENTS = 1 << 18

RowWeight = float | Tensor


def small_rows(
    logits: Tensor,
    index: Tensor,
    alpha: float,
    row_weight: RowWeight,
    ignored: Tensor | None,
    grad_out: Tensor | None,
) -> Tensor:
    """Weighted loss of every row of ``logits`` ``(N, C)``, as ``(N, 1)``.

    Args:
        logits: Rows of logits, any floating dtype.
        index: ``(N, 1)`` int64 valid class indices (ignored rows hold any valid class).
        alpha: The relaxation, a Python float in (0, 1).
        row_weight: Each row's weight, already divided by the mean's denominator: a Python
            float shared by every row, or ``(N, 1)`` in the compute dtype.
        ignored: ``(N, 1)`` bool, rows that do not count, or ``None`` when all count; they get
            exactly zero loss and gradient whatever their logits hold.
        grad_out: ``None`` (loss only) or an ``(N, C)`` buffer that receives ``w·(p - q)``.

    Returns:
        The weighted loss rows, ``(N, 1)`` in the compute dtype.
    """
    dtype = compute_dtype(logits.dtype)
    direct = grad_out is not None and grad_out.dtype == dtype
    # ATen's log_softmax over a short last dimension costs several times these calls. Half
    # precision logits minus a float32 column promote to float32 in the same call.
    row_max = logits.amax(-1, keepdim=True)
    if row_max.dtype != dtype:
        row_max = row_max.to(dtype)
    shifted = torch.sub(logits, row_max, out=grad_out) if direct else torch.sub(logits, row_max)
    target_shifted = shifted.gather(-1, index)
    mass = shifted.exp_()
    mass.scatter_(-1, index, 0.0)
    rest = mass.sum(-1, keepdim=True)
    # total = rest + p'_y, and log(total) = log1p(rest + (p'_y - 1)) with p'_y - 1 as expm1:
    # where y is the row's maximum that is exactly 0, and log1p keeps the relative precision
    # of rest (r = 1 - p_y is never formed by a subtraction); elsewhere p_y <= 1/2 and the sum
    # is well conditioned.
    total_minus_one = torch.add(rest, torch.expm1(target_shifted))
    log_total = torch.log1p(total_minus_one)
    total = total_minus_one.add_(1.0)
    # r - alpha with r = rest/total: one decision, inside the credal set or not, for loss and
    # gradient. `excess <= 0` is False for NaN: NaN logits give NaN, as in cross-entropy.
    excess = torch.sub(rest, total, alpha=alpha).div_(total)
    inside = excess <= 0.0
    # (1-a)·(log(1-a) - log p_y) + a·(log a - log r), with log p_y = (z_y - m) - log(total)
    # and log r = log(rest) - log(total), is log(total) - (1-a)·(z_y - m) - a·log(rest) + c.
    log_rest = rest.log()
    constant = (1 - alpha) * math.log1p(-alpha) + alpha * math.log(alpha)
    loss = torch.add(log_total, target_shifted, alpha=alpha - 1)
    loss = loss.add_(log_rest, alpha=-alpha).add_(constant).masked_fill_(inside, 0.0)
    if not (isinstance(row_weight, float) and row_weight == 1.0):
        loss = loss.mul_(row_weight)
    if ignored is not None:
        loss = loss.masked_fill_(ignored, 0.0)
    if grad_out is not None:
        _write_gradient(mass, index, rest, excess, row_weight, ignored)
        if not direct:
            grad_out.copy_(mass)
    return loss


def _write_gradient(
    mass: Tensor,
    index: Tensor,
    rest: Tensor,
    excess: Tensor,
    row_weight: RowWeight,
    ignored: Tensor | None,
) -> None:
    """Turn the unnormalised ``p'`` in ``mass`` (target entries zeroed) into ``w·(p - q)``.

    With ``r = rest/total`` and ``excess = r - alpha``: off-target entries
    ``p_k·(1 - alpha/r) = p'_k·excess/rest``, the target entry ``-excess``. Clamping at 0 zeroes
    the rows inside the credal set (``rest = 0`` gives ``-inf``, clamped to 0) and keeps NaN.
    """
    scale = torch.div(excess, rest).clamp_min_(0.0)
    # -excess clamped from above: rows inside the set get +0, not the -0 of -(excess⁺).
    target_grad = excess.neg_().clamp_max_(0.0)
    if not (isinstance(row_weight, float) and row_weight == 1.0):
        scale = scale.mul_(row_weight)
        target_grad = target_grad.mul_(row_weight)
    mass.mul_(scale)
    mass.scatter_(-1, index, target_grad)
    if ignored is not None:
        # Rows that do not count may hold garbage (NaN, only -inf) that 0·NaN would keep.
        mass.masked_fill_(ignored, 0.0)
