"""Fused eager implementation: loss and gradient ``p - q`` in one chunked pass over the logits.

Cross-entropy in eager PyTorch writes a full log-softmax in the forward pass and computes one
more exponential pass in the backward pass. Here the forward pass walks the logits in row
chunks small enough to stay in cache and, for each chunk, computes the row statistics and
writes the finished, already weighted gradient. The backward pass only scales it by the
incoming gradient, and skips even that when the incoming gradient is exactly 1 on the CPU. The
logits are read once from memory and the gradient is written once.

This path runs in plain eager mode only; :mod:`label_relaxation.functional` sends
``torch.compile``, ``torch.func`` and forward-mode AD to the pure formulation instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from label_relaxation._closed_form import (
    AlphaLike,
    log_alpha_terms,
    log_target_probability,
    relaxation_loss,
)

# About 16 MiB of float32 per chunk: well inside this class of machine's L3 cache, large enough
# that the Python loop over chunks costs little next to the arithmetic.
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk(
    logits: Tensor,
    target: Tensor,
    alpha: AlphaLike,
    row_weight: Tensor,
    work: Tensor,
    write_grad: bool,
) -> Tensor:
    """Loss rows of one chunk; with ``write_grad`` also leave ``w·(p - q)`` in ``work``.

    ``work`` has the chunk's shape in the compute dtype and may alias ``logits`` (in-place mode).
    ``target`` is ``(R, 1)``, ``row_weight`` ``(R, 1)`` and a tensor ``alpha`` ``(R, 1)``.
    """
    dtype = work.dtype
    shift = logits.amax(-1, keepdim=True).to(dtype)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    target_shifted = logits.gather(-1, target).to(dtype) - shift
    torch.sub(logits, shift, out=work)
    work.exp_()
    work.scatter_(-1, target, 0.0)
    s_rest = work.sum(-1, keepdim=True)
    s_total = s_rest + target_shifted.exp()
    r = s_rest / s_total
    active = r > alpha
    # Weight 0 (ignored rows) gives exact zeros even for garbage logits; a NaN weight (a bad
    # target that could not be checked in Python) stays NaN in loss and gradient.
    counted = row_weight != 0

    log_s_total = s_total.log()
    log_r = s_rest.log() - log_s_total
    log_p_target = log_target_probability(r, target_shifted, log_s_total)
    log_alpha, log1m_alpha = log_alpha_terms(alpha)
    loss = relaxation_loss(log_p_target, log_r, alpha, log_alpha, log1m_alpha)
    zero = torch.zeros((), dtype=dtype, device=work.device)
    loss = torch.where(counted, row_weight * torch.where(active, loss, zero), zero)
    if write_grad:
        # Off-target entries: p_k·(1 - alpha/r) = exp(z_k - m)·(1 - alpha/r)/s_total.
        # Target entry: p_y - (1 - alpha) = alpha - r. Both vanish inside the credal set.
        off_target = torch.where(active, (1 - alpha / r) / s_total, zero)
        on_target = torch.where(active, alpha - r, zero)
        off_target = torch.where(counted, row_weight * off_target, zero)
        on_target = torch.where(counted, row_weight * on_target, zero)
        work.mul_(off_target)
        work.scatter_(-1, target, on_target)
    return loss


def fused_rows(
    logits: Tensor,
    target: Tensor,
    alpha: AlphaLike,
    row_weight: Tensor,
    grad_out: Tensor | None,
) -> Tensor:
    """Weighted loss rows of ``logits`` ``(N, C)``; optionally write the gradient to ``grad_out``.

    ``grad_out`` is ``None`` (forward only: a single chunk-sized scratch buffer is reused),
    a fresh ``(N, C)`` tensor, or ``logits`` itself (in-place mode).
    """
    rows, num_classes = logits.shape
    dtype = compute_dtype(logits.dtype)
    chunk_rows = max(1, CHUNK_ELEMENTS // num_classes)
    direct = grad_out is not None and grad_out.dtype == dtype
    scratch = None
    if not direct:
        scratch = logits.new_empty((min(chunk_rows, rows), num_classes), dtype=dtype)
    loss = logits.new_empty((rows, 1), dtype=dtype)
    target = target.unsqueeze(-1)
    row_weight = row_weight.unsqueeze(-1)
    if isinstance(alpha, Tensor):
        alpha = alpha.unsqueeze(-1)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        if grad_out is not None and direct:
            work = grad_out[start:stop]
        else:
            assert scratch is not None
            work = scratch[: stop - start]
        alpha_chunk = alpha[start:stop] if isinstance(alpha, Tensor) else alpha
        loss[start:stop] = _chunk(
            logits[start:stop],
            target[start:stop],
            alpha_chunk,
            row_weight[start:stop],
            work,
            write_grad=grad_out is not None,
        )
        if grad_out is not None and not direct:
            grad_out[start:stop].copy_(work)
    return loss.squeeze(-1)


_DOUBLE_BACKWARD = (
    "label_relaxation_loss: the fused implementation computes its gradient in the forward "
    "pass and supports first-order reverse mode only. For double backward "
    "(create_graph=True, Hessians), call it with implementation='reference', or use "
    "torch.func transforms, which use that implementation automatically."
)
_SECOND_BACKWARD = (
    "label_relaxation_loss: backward was called a second time through the same graph "
    "(retain_graph=True) after the first one scaled the fused implementation's gradient "
    "buffer in place by an incoming gradient other than 1. Call it with "
    "implementation='reference' to backpropagate through the same graph more than once."
)


class FusedLabelRelaxation(torch.autograd.Function):
    """Autograd node of the fused path: the forward pass stores the finished gradient."""

    @staticmethod
    def forward(
        logits: Tensor,
        target: Tensor,
        alpha: AlphaLike,
        row_weight: Tensor,
        reduce: bool,
        inplace: bool,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(loss, grad)``; ``loss`` is the sum of weighted rows when ``reduce``."""
        grad = logits if inplace else torch.empty_like(logits)
        loss_rows = fused_rows(logits, target, alpha, row_weight, grad)
        loss = loss_rows.sum() if reduce else loss_rows
        # In in-place mode the gradient is the logits' own storage, which setup_context takes
        # from the inputs; an empty placeholder keeps the output structure fixed.
        return loss, (logits.new_empty(0) if inplace else grad)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        """Save the gradient buffer; autograd frees it with the graph, as any saved tensor."""
        logits, _, _, _, _, inplace = inputs
        ctx.save_for_backward(logits if inplace else output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.scaled_in_place = False

    @staticmethod
    def backward(
        ctx: Any, grad_loss: Tensor | None, _unused: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        """Scale the stored gradient by ``grad_loss``, handing the buffer over where possible."""
        none = (None, None, None, None, None)
        if grad_loss is None:
            return (None, *none)
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        if ctx.scaled_in_place:
            raise RuntimeError(_SECOND_BACKWARD)
        (grad,) = ctx.saved_tensors
        if grad_loss.dim() > 0:
            # reduction="none": a full pass is needed anyway; out of place keeps the graph
            # reusable (gradcheck, jacobians).
            return (grad * grad_loss.unsqueeze(-1).to(grad.dtype), *none)
        # On the CPU reading the scalar is a plain memory read, not a device sync, and
        # loss.backward() passes exactly 1: then the buffer is handed over untouched.
        if grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            return (grad, *none)
        ctx.scaled_in_place = True
        return (grad.mul_(grad_loss.to(grad.dtype)), *none)
