"""Kernel of the loss over logits split along the classes across ranks (tensor parallelism).

Each rank holds the logits of every row for its own slice of the classes. The closed form needs
per row only the maximum, the non-target mass and the target's shifted logit (its mass is the
exponential of that; :mod:`label_relaxation._impl.closed_form`), so the forward pass makes two
all-reduces of a few numbers per row: the maximum, then the two sums, stacked into one tensor
(the rank that holds a row's target contributes its shifted logit, the others 0). Every rank then
holds the same loss rows, and computes the gradient of its own slice, ``w·(p - q)``, locally:
the backward pass communicates nothing.

The collectives are PyTorch's functional collectives, which ``torch.compile`` traces.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from label_relaxation._impl.closed_form import AlphaLike
from label_relaxation._impl.compiled import (
    RowCoefficients,
    coefficients_from_statistics,
    gradient_from_coefficients,
    is_target_mask,
    shifted_exp,
)


def _global_statistics(
    local_logits: Tensor, local_target: Tensor, held: Tensor, dtype: torch.dtype, group: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """``(shift, rest, target_shifted)`` of every row over all ranks.

    ``local_target`` ``(N,)`` is the target's index in this rank's slice where ``held``, and -1
    elsewhere; ``shift`` is ``(N, 1)``, the others ``(N,)``.
    """
    local_max = local_logits.amax(-1).to(dtype)
    shift = funcol.all_reduce(local_max, "max", group)
    # Rows of only -inf get shift 0; a +inf or NaN maximum stays and gives NaN.
    shift = torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift).unsqueeze(-1)
    safe = torch.where(held, local_target, 0).unsqueeze(-1)
    target_shifted = torch.where(
        held, (local_logits.gather(-1, safe).to(dtype) - shift).squeeze(-1), 0.0
    )
    mass = shifted_exp(local_logits, shift)
    is_target = is_target_mask(local_logits, local_target)
    # The non-target mass summed directly, never as total - target.
    rest = torch.where(is_target, torch.zeros_like(mass), mass).sum(-1)
    # One rank holds each target: the sum of the shifted target logits is that rank's value.
    sums = funcol.all_reduce(torch.stack([rest, target_shifted]), "sum", group)
    return shift, sums[0], sums[1]


def vocab_parallel_coefficients(
    local_logits: Tensor,
    local_target: Tensor,
    held: Tensor,
    alpha: AlphaLike,
    row_weight: Tensor,
    group: Any,
) -> RowCoefficients:
    """Loss rows (the same on every rank) and the gradient coefficients of this rank's slice."""
    shift, rest, target_shifted = _global_statistics(
        local_logits, local_target, held, row_weight.dtype, group
    )
    return coefficients_from_statistics(shift, rest, target_shifted, alpha, row_weight)


def eager_vocab_parallel(
    local_logits: Tensor,
    local_target: Tensor,
    held: Tensor,
    alpha: AlphaLike,
    row_weight: Tensor,
    group: Any,
    work: Tensor,
) -> RowCoefficients:
    """The eager kernel: statistics, loss rows, and the local gradient written into ``work``.

    ``work`` ``(N, C_local)`` in the compute dtype may alias ``local_logits`` (the fused linear
    loss owns its block of logits). Passes over the slice: the maximum, the exponential, the
    sum and the gradient's scaling, with no buffer but ``work``: in eager mode every fresh
    full-size temporary costs page faults on top of its pass.
    """
    dtype = work.dtype
    shift = funcol.all_reduce(local_logits.amax(-1).to(dtype), "max", group)
    shift = torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift).unsqueeze(-1)
    safe = torch.where(held, local_target, 0).unsqueeze(-1)
    held_column = held.unsqueeze(-1)
    # Read before `work` (which may alias the logits) is overwritten.
    target_shifted = torch.where(
        held, (local_logits.gather(-1, safe).to(dtype) - shift).squeeze(-1), 0.0
    )
    torch.sub(local_logits, shift, out=work).exp_()
    # The target's entry set to 0 where this rank holds it (elsewhere column 0 is rewritten
    # with its own value), so the sum is the non-target mass, never total - target.
    work.scatter_(-1, safe, torch.where(held_column, 0.0, work.gather(-1, safe)))
    # One rank holds each target: the sum of the shifted target logits is that rank's value.
    sums = funcol.all_reduce(torch.stack([work.sum(-1), target_shifted]), "sum", group)
    coefficients = coefficients_from_statistics(shift, sums[0], sums[1], alpha, row_weight)
    work.mul_(coefficients.off_target.unsqueeze(-1))
    on_target = coefficients.on_target.unsqueeze(-1)
    work.scatter_(-1, safe, torch.where(held_column, on_target, work.gather(-1, safe)))
    # Rows that do not count may hold garbage (NaN, inf) that a zero coefficient keeps.
    dropped = ~coefficients.keep
    if work.device.type != "cpu" or bool(dropped.any()):
        work.masked_fill_(dropped.unsqueeze(-1), 0.0)
    return coefficients


class VocabParallelLoss(torch.autograd.Function):
    """Loss rows of class-sharded logits; the forward pass keeps the local gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        local_logits: Tensor,
        local_target: Tensor,
        held: Tensor,
        alpha: AlphaLike,
        row_weight: Tensor,
        group: Any,
    ) -> Tensor:
        """``local_logits`` ``(N, C_local)``; returns the weighted loss rows ``(N,)``."""
        if torch.compiler.is_compiling():
            # Traceable operations, which Inductor fuses.
            coefficients = vocab_parallel_coefficients(
                local_logits, local_target, held, alpha, row_weight, group
            )
            grad = gradient_from_coefficients(local_logits, local_target, coefficients, held=held)
        else:
            grad = torch.empty_like(local_logits, dtype=row_weight.dtype)
            coefficients = eager_vocab_parallel(
                local_logits, local_target, held, alpha, row_weight, group, grad
            )
        ctx.save_for_backward(grad.to(local_logits.dtype))
        return coefficients.loss

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        """Scale each row of the stored local gradient: no communication."""
        if torch.is_grad_enabled():
            raise RuntimeError(
                "label_relaxation: the vocabulary-parallel loss supports first-order reverse "
                "mode only (no create_graph=True)"
            )
        (grad,) = ctx.saved_tensors
        return grad * grad_rows.unsqueeze(-1).to(grad.dtype), None, None, None, None, None


def vocab_parallel_rows(
    local_logits: Tensor,
    target: Tensor,
    vocab_start: int,
    alpha: AlphaLike,
    row_weight: Tensor,
    group: dist.ProcessGroup,
) -> Tensor:
    """Weighted loss rows of ``local_logits`` ``(N, C_local)`` holding classes from ``vocab_start``.

    ``target`` ``(N,)`` holds valid global class indices (the same on every rank).
    """
    local_target = target - vocab_start
    held = (local_target >= 0) & (local_target < local_logits.shape[-1])
    local_target = torch.where(held, local_target, -1)
    loss: Tensor = VocabParallelLoss.apply(
        local_logits, local_target, held, alpha, row_weight, group
    )
    return loss
