"""Shapes for the pytest-benchmark suite: ``BENCH_SHAPES=8192x32000,2048x128256`` overrides."""

from __future__ import annotations

import os

DEFAULT_SHAPES = "2048x32000,2x512x8192"


def bench_shapes() -> list[tuple[int, ...]]:
    text = os.environ.get("BENCH_SHAPES", DEFAULT_SHAPES)
    return [tuple(int(size) for size in part.split("x")) for part in text.split(",") if part]
