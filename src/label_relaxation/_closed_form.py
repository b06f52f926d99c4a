"""The closed form of the label relaxation loss, from per-row mass statistics.

Both implementations (the pure formulation and the fused kernel) reduce every row of logits
``z`` with target ``y`` to three numbers, after one max shift ``m``:

* ``s_rest = sum_{k != y} exp(z_k - m)``, the non-target mass, summed directly so that
  ``r = 1 - p_y`` is never formed by subtracting from 1;
* ``s_total = s_rest + exp(z_y - m)``;
* ``z_y - m``, the shifted target logit.

From these, with ``r = s_rest / s_total``, a row is *active* (outside the credal set) iff
``r > alpha``, and its loss is ``(1-a)·log((1-a)/p_y) + a·log(a/r)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AlphaLike = float | Tensor

# The fused kernels, and the pure formulation under torch.compile, compute exp(x) as
# exp2(x·log2(e)): exp2 is the cheaper kernel in ATen (about half the time of exp on AVX2) and
# in Inductor's generated code, as bench/exp2_vs_exp.py measures.
LOG2_E = math.log2(math.e)


def log_alpha_terms(alpha: AlphaLike) -> tuple[AlphaLike, AlphaLike]:
    """Return ``(log(alpha), log(1 - alpha))`` for a Python float or a tensor alpha."""
    if isinstance(alpha, Tensor):
        return torch.log(alpha), torch.log1p(-alpha)
    return math.log(alpha), math.log1p(-alpha)


def log_target_probability(r: Tensor, target_shifted: Tensor, log_s_total: Tensor) -> Tensor:
    """``log p_y`` computed without cancellation.

    For ``p_y > 1/2`` (``r < 1/2``) ``log1p(-r)`` keeps full relative precision where
    ``log p_y`` is close to 0; elsewhere ``z_y - m - log s_total`` never underflows, unlike
    ``log(p_y)`` for saturated rows. The unselected branch gets safe inputs so that its gradient
    cannot poison the selected one with ``inf * 0``.
    """
    near_one = r < 0.5
    r_small = torch.where(near_one, r, torch.zeros_like(r))
    return torch.where(near_one, torch.log1p(-r_small), target_shifted - log_s_total)


def relaxation_loss(
    log_p_target: Tensor,
    log_r: Tensor,
    alpha: AlphaLike,
    log_alpha: AlphaLike,
    log1m_alpha: AlphaLike,
) -> Tensor:
    """``(1-a)·(log(1-a) - log p_y) + a·(log a - log r)``: the KL divergence to the projection."""
    return (1 - alpha) * (log1m_alpha - log_p_target) + alpha * (log_alpha - log_r)
