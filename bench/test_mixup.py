"""pytest-benchmark: two-class mixup label relaxation against the plain loss (C <= 1000).

The target for the mixup loss is forward+backward within 2x of the plain loss at the same shape.
Run with ``uv run pytest bench --benchmark-only -k mixup``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from label_relaxation import label_relaxation_loss, mixup_label_relaxation_loss

SHAPES = [(65536, 10), (16384, 100), (4096, 1000)]


def _name(shape: tuple[int, int]) -> str:
    return "x".join(map(str, shape))


@pytest.mark.parametrize("shape", SHAPES, ids=_name)
@pytest.mark.parametrize("loss", ["plain", "mixup"])
def test_mixup_forward_backward(benchmark: Any, shape: tuple[int, int], loss: str) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=generator) * 2
    a = torch.randint(0, shape[1], shape[:1], generator=generator)
    b = torch.randint(0, shape[1], shape[:1], generator=generator)
    lam = torch.rand(shape[:1], generator=generator)
    benchmark.group = f"mixup vs plain {_name(shape)}"

    def setup() -> tuple[tuple[torch.Tensor], dict[str, Any]]:
        return (logits.detach().requires_grad_().clone(),), {}

    def step(z: torch.Tensor) -> None:
        if loss == "plain":
            label_relaxation_loss(z, a, 0.1).backward()
        else:
            mixup_label_relaxation_loss(z, a, b, lam, 0.1).backward()

    benchmark.pedantic(step, setup=setup, rounds=15, iterations=1, warmup_rounds=2)
