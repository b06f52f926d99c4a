"""Float64 reference: the explicit KL projection onto the credal set, written out step by step.

Deliberately independent of the package: no shared helpers, no closed form. The projection
``q`` is built as a vector and the divergence ``KL(q || p)`` summed term by term.
"""

from __future__ import annotations

import torch
from torch import Tensor


def projection(
    logits: Tensor, target: Tensor, alpha: Tensor | float
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(p, q, inside)`` in float64 for logits ``(N, C)`` and class indices ``(N,)``."""
    z = logits.detach().to(torch.float64)
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    alpha = torch.as_tensor(alpha, dtype=torch.float64).expand(target.shape)
    is_target = torch.nn.functional.one_hot(target, z.shape[-1]).bool()
    # The non-target mass summed directly: 1 - p_y would cancel in float64 too.
    non_target_mass = torch.where(is_target, 0.0, p).sum(-1)
    inside = non_target_mass <= alpha
    q_off = alpha[:, None] * p / non_target_mass[:, None].clamp_min(1e-300)
    q = torch.where(is_target, (1 - alpha)[:, None], q_off)
    q = torch.where(inside[:, None], p, q)
    return p, q, inside


def projected_kl(logits: Tensor, target: Tensor, alpha: Tensor | float) -> Tensor:
    """Per-row loss ``KL(q || p)``, 0 inside the credal set."""
    z = logits.detach().to(torch.float64)
    log_p = torch.log_softmax(z, dim=-1)
    _, q, inside = projection(logits, target, alpha)
    terms = torch.where(q > 0, q * (torch.log(q) - log_p), 0.0)
    return torch.where(inside, 0.0, terms.sum(-1))


def loss_scale(logits: Tensor, target: Tensor, alpha: Tensor | float) -> Tensor:
    """Magnitude of the two terms whose difference is the closed-form loss.

    ``(1-a)·log((1-a)/p_y)`` is positive and ``a·log(a/r)`` negative outside the set, so the
    loss can be far smaller than either; a float32 computation carries errors of a few ulp
    of the terms, not of their difference.
    """
    z = logits.detach().to(torch.float64)
    log_p = torch.log_softmax(z, dim=-1)
    p, _, _ = projection(logits, target, alpha)
    alpha = torch.as_tensor(alpha, dtype=torch.float64).expand(target.shape)
    log_py = log_p.gather(-1, target[:, None]).squeeze(-1)
    is_target = torch.nn.functional.one_hot(target, z.shape[-1]).bool()
    r = torch.where(is_target, 0.0, p).sum(-1)
    first = (1 - alpha) * (torch.log1p(-alpha) - log_py)
    second = alpha * (torch.log(alpha) - torch.log(r.clamp_min(1e-300)))
    return 1 + first.abs() + second.abs()


def expected_gradient(logits: Tensor, target: Tensor, alpha: Tensor | float) -> Tensor:
    """``p - q`` per row (zero inside the credal set), in float64."""
    p, q, _ = projection(logits, target, alpha)
    return p - q


def closed_form(logits: Tensor, target: Tensor, alpha: float) -> Tensor:
    """Differentiable closed form in the logits' dtype, for higher derivatives in float64.

    Written independently of the package: log p_y from log_softmax, log(1 - p_y) as a
    logsumexp over the non-target logits.
    """
    log_p = torch.log_softmax(logits, dim=-1)
    is_target = torch.nn.functional.one_hot(target, logits.shape[-1]).bool()
    log_py = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    log_rest = torch.logsumexp(torch.where(is_target, float("-inf"), log_p), dim=-1)
    loss = (1 - alpha) * (torch.log1p(torch.tensor(-alpha)) - log_py) + alpha * (
        torch.log(torch.tensor(alpha)) - log_rest
    )
    return torch.where(log_rest > torch.log(torch.tensor(alpha)), loss, torch.zeros_like(loss))
