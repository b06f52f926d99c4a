"""Reference (2): the 2022 PyTorch port of the loss, step by step.

Frozen: edit only to keep it running. Written for this project from the published description
of the port; it keeps the port's quirks: the one-hot encoding infers the number of classes from
the batch, ``1 - alpha`` is built from that integer tensor (so it is rounded to float32 even in
a float64 run), ``q`` is computed under ``no_grad``, and the zero rule is strict (``>``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def credal_target(probabilities: Tensor, one_hot: Tensor, alpha: float) -> Tensor:
    """The port's target q, computed without gradient."""
    with torch.no_grad():
        non_target_mass = torch.sum((1 - one_hot) * probabilities, dim=-1)
        relaxed = alpha * probabilities / non_target_mass.unsqueeze(-1)
        # Built from the integer one-hot tensor: int64 times a Python float gives the default
        # dtype, float32, whatever the dtype of the logits.
        target_value = torch.ones_like(one_hot) * (1 - alpha)
        return torch.where(one_hot > 0.1, target_value, relaxed)


def per_sample_loss(logits: Tensor, target: Tensor, alpha: float) -> Tensor:
    """The port's loss per sample, for class-index targets."""
    probabilities = torch.softmax(logits, dim=-1)
    one_hot = F.one_hot(target)  # the number of classes is inferred from the batch
    q = credal_target(probabilities, one_hot, alpha)
    divergence = torch.sum(F.kl_div(probabilities.log(), q, reduction="none"), dim=-1)
    target_probability = torch.sum(probabilities * one_hot, dim=-1)
    return torch.where(target_probability > 1 - alpha, torch.zeros_like(divergence), divergence)


def loss(logits: Tensor, target: Tensor, alpha: float) -> Tensor:
    """Mean over the batch."""
    return per_sample_loss(logits, target, alpha).mean()
