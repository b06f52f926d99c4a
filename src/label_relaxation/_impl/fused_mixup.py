"""Fused eager kernel for two-class (mixup/CutMix) targets ``lam·e_a + (1-lam)·e_b``.

With at most two bounded classes the water-filling projection has three candidates, so no sort
is needed: with ``c_a = lam(1-α)``, ``c_b = (1-lam)(1-α)``, ``ρ_k = c_k/p_k`` and ``hi`` the
class of the larger ratio,

* inside the set (``p_a >= c_a`` and ``p_b >= c_b``): ``q = p``;
* only ``hi`` clamped: ``τ = (1 - c_hi) / Σ_{k≠hi} p_k``, valid when ``ρ_lo < τ``;
* both clamped: ``τ = α / Σ_{k∉{a,b}} p_k``.

As in the plain fused kernel, each chunk of rows stays in cache while its masses are summed
directly (never ``1 - p_a - p_b``) and the finished gradient ``w·(p - q)`` is written; the
pure formulation in :mod:`label_relaxation.soft` serves compilation and transforms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from label_relaxation._impl.closed_form import exp_base
from label_relaxation._impl.fused import (
    exp_shifted_into,
    exponent,
    for_each_chunk,
    power,
    row_exponent_shift,
)


class _Projection(NamedTuple):
    """Per-row projection, every field ``(R, 1)``."""

    inside: Tensor  # bool: p already in the credal set
    tau: Tensor
    p_a: Tensor
    p_b: Tensor
    total: Tensor  # unnormalised mass of the row
    q_a: Tensor
    q_b: Tensor
    log_p_a: Tensor
    log_p_b: Tensor
    rest: Tensor  # non-a, non-b mass, normalised


def _project(
    log_shifted_a: Tensor,
    log_shifted_b: Tensor,
    e_a: Tensor,
    e_b: Tensor,
    e_rest: Tensor,
    c_a: Tensor,
    c_b: Tensor,
    alpha: float | Tensor,
) -> _Projection:
    """The water-filling solution for two bounded classes (``c_b = 0`` when ``a == b``)."""
    total = e_rest + e_a + e_b
    log_total = total.log()
    log_p_a = log_shifted_a - log_total
    log_p_b = log_shifted_b - log_total
    p_a, p_b, rest = e_a / total, e_b / total, e_rest / total
    neg_inf = torch.full_like(p_a, float("-inf"))
    log_ratio_a = torch.where(c_a > 0, c_a.log() - log_p_a, neg_inf)
    log_ratio_b = torch.where(c_b > 0, c_b.log() - log_p_b, neg_inf)
    a_is_hi = log_ratio_a >= log_ratio_b
    c_lo = torch.where(a_is_hi, c_b, c_a)
    p_lo = torch.where(a_is_hi, p_b, p_a)
    log_ratio_lo = torch.where(a_is_hi, log_ratio_b, log_ratio_a)
    # 1 - c_hi = alpha + (1 - alpha)·t_lo = alpha + c_lo: a sum, no cancellation.
    tau_one = (alpha + c_lo) / (rest + p_lo)
    one_clamped = log_ratio_lo < tau_one.log()
    tau_two = alpha / rest
    inside = (log_ratio_a < 0) & (log_ratio_b < 0)
    tau = torch.where(inside, torch.ones_like(p_a), torch.where(one_clamped, tau_one, tau_two))
    q_a = torch.maximum(c_a, tau * p_a)
    q_b = torch.maximum(c_b, tau * p_b)
    return _Projection(inside, tau, p_a, p_b, total, q_a, q_b, log_p_a, log_p_b, rest)


def _chunk(
    logits: Tensor,
    index_a: Tensor,
    index_b: Tensor,
    c_a: Tensor,
    c_b: Tensor,
    alpha: float | Tensor,
    row_weight: Tensor,
    work: Tensor,
    write_grad: bool,
) -> Tensor:
    """Weighted loss of one chunk; with ``write_grad`` leave ``w·(p - q)`` in ``work``."""
    base = exp_base(logits.device)
    neg_shift = row_exponent_shift(logits, work.dtype, base)
    neg_shift = torch.where(torch.isfinite(neg_shift), neg_shift, 0.0)
    exponent_a = exponent(logits.gather(-1, index_a).to(work.dtype), neg_shift, base)
    exponent_b = exponent(logits.gather(-1, index_b).to(work.dtype), neg_shift, base)
    exp_shifted_into(logits, neg_shift, work, base)
    same = index_a == index_b
    e_a = power(exponent_a, base)
    # When a == b the target is one-hot: class b contributes no mass of its own.
    e_b = torch.where(same, 0.0, power(exponent_b, base))
    work.scatter_(-1, index_a, 0.0)
    work.scatter_(-1, index_b, 0.0)
    e_rest = work.sum(-1, keepdim=True)
    shifted_a = base.to_natural * exponent_a
    shifted_b = torch.where(same, float("-inf"), base.to_natural * exponent_b)
    proj = _project(shifted_a, shifted_b, e_a, e_b, e_rest, c_a, c_b, alpha)
    zero = torch.zeros((), dtype=work.dtype, device=work.device)
    log_tau = proj.tau.log()
    loss = proj.tau * proj.rest * torch.where(proj.rest > 0, log_tau, zero)
    loss = loss + torch.where(proj.q_a > 0, proj.q_a * (proj.q_a.log() - proj.log_p_a), zero)
    loss = loss + torch.where(proj.q_b > 0, proj.q_b * (proj.q_b.log() - proj.log_p_b), zero)
    loss = torch.where(proj.inside, zero, loss)
    if write_grad:
        work.mul_(row_weight * (1 - proj.tau) / proj.total)
        # Scatter b first: when a == b, a's entry must win.
        work.scatter_(-1, index_b, row_weight * (proj.p_b - proj.q_b))
        work.scatter_(-1, index_a, row_weight * (proj.p_a - proj.q_a))
    return torch.where(row_weight != 0, row_weight * loss, zero)


def fused_mixup_rows(
    logits: Tensor,
    index_a: Tensor,
    index_b: Tensor,
    c_a: Tensor,
    c_b: Tensor,
    alpha: float | Tensor,
    row_weight: Tensor,
    grad_out: Tensor | None,
) -> Tensor:
    """Weighted loss rows of ``logits`` ``(N, C)``; optionally write the gradient to ``grad_out``.

    ``index_a``, ``index_b``, ``c_a``, ``c_b``, ``row_weight`` and a tensor ``alpha`` are
    ``(N,)``; ``c_b`` is 0 where ``index_a == index_b``.
    """
    columns = [t.unsqueeze(-1) for t in (index_a, index_b, c_a, c_b, row_weight)]
    column_alpha = alpha.unsqueeze(-1) if isinstance(alpha, Tensor) else alpha
    losses: list[Tensor] = []

    def step(chunk: slice, work: Tensor) -> None:
        a, b, ca, cb, w = (column[chunk] for column in columns)
        chunk_alpha = column_alpha[chunk] if isinstance(column_alpha, Tensor) else column_alpha
        losses.append(
            _chunk(logits[chunk], a, b, ca, cb, chunk_alpha, w, work, grad_out is not None)
        )

    for_each_chunk(logits, grad_out, step)
    return torch.cat(losses).squeeze(-1)
