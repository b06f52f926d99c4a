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

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from label_relaxation._closed_form import AlphaLike, log_alpha_terms, relaxation_loss

# 8 MiB of float32 per chunk: the chunk and its gradient rows together stay inside a 32 MiB L3
# cache (the 2-core AMD EPYC this was tuned on), while chunks stay large enough that the
# Python loop over them costs little next to the arithmetic.
CHUNK_ELEMENTS = 1 << 21


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _RowStatistics(NamedTuple):
    """Per-row results of the chunk loop, each ``(N, 1)`` in the compute dtype.

    The softmax kernel normalises by a sequentially accumulated sum, off by up to ~3e-6
    relative (measured at C = 4099); every ``p'_k`` carries the same factor, so ratios of the
    cascade-summed masses ``rest`` and ``total = rest + p'_y`` are exact to a few ulp.
    """

    rest: Tensor  # sum of p'_k over k != y, summed directly: never 1 - p_y
    target: Tensor  # p'_y
    log_target_tail: Tensor  # log p_y for rows where p'_y is too small for log(p'_y)


def _small_probability(dtype: torch.dtype) -> float:
    """Below this, ``log(p)`` of a computed probability may have lost relative precision."""
    info = torch.finfo(dtype)
    # tiny / eps: the smallest value with a full mantissa's worth of headroom above subnormals.
    return float(info.tiny / info.eps)


def _chunk(
    logits: Tensor,
    target: Tensor,
    alpha: AlphaLike,
    row_weight: Tensor,
    work: Tensor,
    stats: _RowStatistics,
    write_grad: bool,
) -> None:
    """Fill one chunk's rows of ``stats``; with ``write_grad`` leave ``w·(p - q)`` in ``work``.

    ``work`` has the chunk's shape in the compute dtype and may alias ``logits`` (in-place mode).
    ``target``, ``row_weight`` and a tensor ``alpha`` are ``(R, 1)``. Every operation here runs
    once per chunk, so the closed form is left to the caller, which evaluates it for all rows.
    """
    dtype = work.dtype
    overwritten = work.data_ptr() == logits.data_ptr()
    # Read before work (which may alias the logits) is overwritten.
    target_logit = logits.gather(-1, target).to(dtype)
    shift = logits.amax(-1, keepdim=True).to(dtype) if overwritten else None
    if dtype != logits.dtype:
        work.copy_(logits)
        torch.softmax(work, -1, out=work)
    else:
        # ATen's softmax walks each row in cache: max, then exp and sum, then scale.
        torch.softmax(logits, -1, out=work)
    torch.gather(work, -1, target, out=stats.target)
    work.scatter_(-1, target, 0.0)
    torch.sum(work, -1, keepdim=True, out=stats.rest)
    total = stats.rest + stats.target

    tail = stats.target < _small_probability(dtype)
    if work.device.type != "cpu" or bool(tail.any()):
        # Saturated rows: log p_y = (z_y - m) - log S with S = sum exp(z - m) = total / p'_max,
        # since the largest logit has p' = 1/S'. Reading the flag is free on the CPU; elsewhere
        # the extra passes beat a device sync.
        if shift is None:
            shift = logits.amax(-1, keepdim=True).to(dtype)
        log_s = total.log() - work.amax(-1, keepdim=True).log()
        torch.sub(target_logit - shift, log_s, out=stats.log_target_tail)

    if write_grad:
        r = stats.rest / total
        active = r > alpha
        # Off-target entries: p_k·(1 - alpha/r) with p_k = p'_k/total. Target entry:
        # p_y - (1 - alpha) = alpha - r. Both vanish inside the credal set. The weight
        # multiplies last: 0 (ignored) gives exact zeros, NaN (an unchecked bad target) NaN.
        off_target = row_weight * torch.where(active, (1 - alpha / r) / total, 0.0)
        on_target = row_weight * torch.where(active, alpha - r, 0.0)
        work.mul_(off_target)
        work.scatter_(-1, target, on_target)


def _loss_from_statistics(stats: _RowStatistics, alpha: AlphaLike, row_weight: Tensor) -> Tensor:
    """Weighted loss of every row from its statistics."""
    total = stats.rest + stats.target
    r = stats.rest / total
    active = r > alpha
    # Inactive rows take a neutral mass so that log(0) never appears.
    log_r = torch.where(active, stats.rest, total).log() - total.log()
    near_one = r < 0.5
    log_p_target = torch.where(
        near_one,
        torch.log1p(-torch.where(near_one, r, 0.0)),
        torch.where(
            stats.target < _small_probability(total.dtype),
            stats.log_target_tail,
            stats.target.log() - total.log(),
        ),
    )
    log_alpha, log1m_alpha = log_alpha_terms(alpha)
    loss = relaxation_loss(log_p_target, log_r, alpha, log_alpha, log1m_alpha)
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return torch.where(row_weight != 0, row_weight * torch.where(active, loss, zero), zero)


def _clear_uncounted_nan_rows(grad: Tensor, rest: Tensor, row_weight: Tensor) -> None:
    """Zero the gradient of ignored rows whose logits were garbage (only ``-inf``, NaN)."""
    garbage = torch.isnan(rest) & (row_weight == 0)
    if grad.device.type != "cpu" or bool(garbage.any()):
        # Reading the flag is free on the CPU; elsewhere one pass beats a device sync.
        grad.masked_fill_(garbage, 0.0)


def for_each_chunk(
    logits: Tensor, grad_out: Tensor | None, step: Callable[[slice, Tensor], None]
) -> None:
    """Walk ``logits`` ``(N, C)`` in row chunks that stay in cache.

    ``step(rows, work)`` gets the chunk's row slice and a work buffer of the chunk's shape in
    the compute dtype: the chunk of ``grad_out`` itself when it has that dtype (possibly the
    logits, in-place mode), else a reused scratch buffer that is copied into ``grad_out``
    (half-precision gradients) or dropped (forward only, ``grad_out`` is ``None``).
    """
    rows, num_classes = logits.shape
    dtype = compute_dtype(logits.dtype)
    chunk_rows = max(1, CHUNK_ELEMENTS // num_classes)
    direct = grad_out is not None and grad_out.dtype == dtype
    scratch = None
    if not direct:
        scratch = logits.new_empty((min(chunk_rows, rows), num_classes), dtype=dtype)
    for start in range(0, rows, chunk_rows):
        chunk = slice(start, min(start + chunk_rows, rows))
        if grad_out is not None and direct:
            work = grad_out[chunk]
        else:
            assert scratch is not None
            work = scratch[: chunk.stop - start]
        step(chunk, work)
        if grad_out is not None and not direct:
            grad_out[chunk].copy_(work)


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
    stats = _RowStatistics(
        *logits.new_empty((3, logits.shape[0], 1), dtype=compute_dtype(logits.dtype))
    )
    target = target.unsqueeze(-1)
    row_weight = row_weight.unsqueeze(-1)
    column_alpha = alpha.unsqueeze(-1) if isinstance(alpha, Tensor) else alpha

    def step(chunk: slice, work: Tensor) -> None:
        _chunk(
            logits[chunk],
            target[chunk],
            column_alpha[chunk] if isinstance(column_alpha, Tensor) else column_alpha,
            row_weight[chunk],
            work,
            _RowStatistics(*(stat[chunk] for stat in stats)),
            write_grad=grad_out is not None,
        )

    for_each_chunk(logits, grad_out, step)
    if grad_out is not None:
        _clear_uncounted_nan_rows(grad_out, stats.rest, row_weight)
    return _loss_from_statistics(stats, column_alpha, row_weight).squeeze(-1)


_DOUBLE_BACKWARD = (
    "label_relaxation: the fused implementation computes its gradient in the forward "
    "pass and supports first-order reverse mode only. For double backward "
    "(create_graph=True, Hessians), call it with implementation='reference', or use "
    "torch.func transforms, which use that implementation automatically."
)
_SECOND_BACKWARD = (
    "label_relaxation: backward was called a second time through the same graph "
    "(retain_graph=True) after the first one scaled the fused implementation's gradient "
    "buffer in place by an incoming gradient other than 1. Call it with "
    "implementation='reference' to backpropagate through the same graph more than once."
)


RowsKernel = Callable[[Tensor | None], Tensor]


class FusedLoss(torch.autograd.Function):
    """Autograd node of the fused kernels: the forward pass stores the finished gradient.

    ``kernel(grad_out)`` returns the weighted loss rows and writes their gradient with respect
    to ``logits`` into ``grad_out`` (a fresh buffer, or ``logits`` itself in in-place mode).
    """

    @staticmethod
    def forward(
        logits: Tensor, kernel: RowsKernel, reduce: bool, inplace: bool
    ) -> tuple[Tensor, Tensor]:
        """Return ``(loss, grad)``; ``loss`` is the sum of weighted rows when ``reduce``."""
        grad = logits if inplace else torch.empty_like(logits)
        loss_rows = kernel(grad)
        loss = loss_rows.sum() if reduce else loss_rows
        # In in-place mode the gradient is the logits' own storage, which setup_context takes
        # from the inputs; an empty placeholder keeps the output structure fixed.
        return loss, (logits.new_empty(0) if inplace else grad)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        """Save the gradient buffer; autograd frees it with the graph, as any saved tensor."""
        logits, _, _, inplace = inputs
        ctx.save_for_backward(logits if inplace else output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.scaled_in_place = False

    @staticmethod
    def backward(
        ctx: Any, grad_loss: Tensor | None, _unused: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        """Scale the stored gradient by ``grad_loss``, handing the buffer over where possible."""
        none = (None, None, None)
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
