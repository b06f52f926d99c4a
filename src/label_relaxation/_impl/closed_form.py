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
from typing import NamedTuple

import torch
from torch import Tensor

AlphaLike = float | Tensor

LOG2_E = math.log2(math.e)


class ExpBase(NamedTuple):
    """How the kernels exponentiate the shifted logits: ``exp(z - m)`` or ``2^(z·log2(e) - ...)``.

    ``bench/exp2_vs_exp.py`` measured ATen's ``exp2`` at 0.56× its ``exp`` on a 2-core AMD EPYC
    with AVX2 (83 against 150 ms per GiB of float32 in 8 MiB chunks), but at 1.41× on a 2-core
    Intel Xeon with AVX-512 (94 against 67 ms, logits shifted by their row maximum as the kernels
    see them; Inductor's code 1.05×). So the CPU uses base 2 only where ATen runs its AVX2
    kernels. In base 2 one fused multiply-add applies scale and shift in a single pass, and
    ``ln(2)`` turns exponents back into natural logs.
    """

    scale: float  # exponent units per logit unit: log2(e), or 1
    to_natural: float  # natural-log units per exponent unit: ln(2), or 1
    two: bool


BASE_TWO = ExpBase(LOG2_E, math.log(2.0), True)
BASE_E = ExpBase(1.0, 1.0, False)
# Whether ATen runs its AVX2 kernels on this CPU (not AVX-512, not the scalar fallback): the
# eager routes that were measured faster there are chosen by it.
CPU_RUNS_AVX2 = torch.backends.cpu.get_cpu_capability() == "AVX2"
_CPU_BASE = BASE_TWO if CPU_RUNS_AVX2 else BASE_E


def exp_base(device: torch.device) -> ExpBase:
    """The cheaper exponential on ``device``: by the CPU's ATen kernels; base 2 elsewhere."""
    return _CPU_BASE if device.type == "cpu" else BASE_TWO


def log_alpha_terms(alpha: AlphaLike) -> tuple[AlphaLike, AlphaLike]:
    """Return ``(log(alpha), log(1 - alpha))`` for a Python float or a tensor alpha."""
    if isinstance(alpha, Tensor):
        return torch.log(alpha), torch.log1p(-alpha)
    if torch.compiler.is_compiling():
        # A float alpha that changes from call to call is a dynamic input of the graph, and
        # math.log would pin it to each value (one recompile per alpha); so would
        # torch.scalar_tensor. Added to a 0-d tensor it stays an input.
        value = torch.zeros((), dtype=torch.float64).add(alpha)
        return torch.log(value), torch.log1p(-value)
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
