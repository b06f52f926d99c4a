"""pytest-benchmark suite: the CLI's variants, forward and forward+backward, grouped per shape.

Run with ``uv run pytest bench --benchmark-only`` (optionally ``THP_MEM_ALLOC_ENABLE=1`` and
``BENCH_SHAPES=...``). Not part of the default test run.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench.conftest import bench_shapes
from label_relaxation.tools.benchmark import MODES, Variant, build_variants

ALPHA = 0.1
VARIANTS = {variant.name: variant for variant in build_variants(ALPHA, MODES)}
SHAPES = bench_shapes()


def _data(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=generator) * 2
    target = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    return logits, target


def _name(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@pytest.mark.parametrize("shape", SHAPES, ids=_name)
@pytest.mark.parametrize("mode", MODES)
def test_forward_backward(benchmark: Any, shape: tuple[int, ...], mode: str) -> None:
    variant: Variant = VARIANTS[mode]
    base, target = _data(shape)
    benchmark.group = f"forward+backward {_name(shape)}"

    def setup() -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]]:
        # A fresh non-leaf copy per round, made outside the timed region.
        leaf = base.detach().requires_grad_()
        return (leaf.clone(), target), {}

    def step(logits: torch.Tensor, target: torch.Tensor) -> None:
        variant.loss(logits, target).backward()

    benchmark.pedantic(step, setup=setup, rounds=7, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("shape", SHAPES, ids=_name)
@pytest.mark.parametrize("mode", MODES)
def test_forward(benchmark: Any, shape: tuple[int, ...], mode: str) -> None:
    variant: Variant = VARIANTS[mode]
    logits, target = _data(shape)
    benchmark.group = f"forward {_name(shape)}"

    def step() -> None:
        with torch.no_grad():
            variant.loss(logits, target)

    benchmark.pedantic(step, rounds=7, iterations=1, warmup_rounds=1)
