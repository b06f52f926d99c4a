"""Where the fused CPU kernel's time goes: per-operator profile and per-chunk overhead.

Run from the repository root: ``THP_MEM_ALLOC_ENABLE=1 uv run python bench/profile_fused.py``.
Prints

* the ``torch.profiler`` table (self CPU time per ATen operator) of one in-place forward pass
  at 8192x32000 float32 (``inplace=True`` on logits that need no gradient: the kernel alone);
* the median time of an in-place forward+backward over logits of 128 rows of 64 classes,
  split into 128 one-row chunks: the Python and dispatch overhead of 128 chunks, which is what
  the large shape's chunks pay on top of the arithmetic;
* in-place forward+backward at 8192x32000 with chunks of 2 to 128 MiB
  (``GRADIENT_CHUNK_ELEMENTS`` 2^19 to 2^25; by default a quarter of the last-level cache),
  medians of 7 interleaved rounds.
"""

from __future__ import annotations

import statistics
import time

import torch

from label_relaxation import label_relaxation_loss
from label_relaxation._impl import fused as _fused


def operator_profile() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(8192, 32000, generator=generator) * 2
    target = torch.randint(0, 32000, (8192,), generator=generator)
    logits = base.clone()
    for _ in range(2):
        logits.copy_(base)
        label_relaxation_loss(logits, target, 0.1, inplace=True)
    logits.copy_(base)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        label_relaxation_loss(logits, target, 0.1, inplace=True)
    print("in-place forward, 8192x32000 float32 (forward-only chunks of 2 MiB):")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def chunk_overhead(rounds: int = 50) -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(128, 64, generator=generator)
    target = torch.randint(0, 64, (128,), generator=generator)
    times = []
    saved = _fused.GRADIENT_CHUNK_ELEMENTS
    _fused.GRADIENT_CHUNK_ELEMENTS = 64  # one row per chunk (the gradient is written in place)
    try:
        for _ in range(rounds):
            leaf = base.detach().requires_grad_()
            logits = leaf.clone()
            start = time.perf_counter()
            label_relaxation_loss(logits, target, 0.1, inplace=True).backward()  # type: ignore[no-untyped-call]
            times.append(time.perf_counter() - start)
    finally:
        _fused.GRADIENT_CHUNK_ELEMENTS = saved
    median_ms = statistics.median(times) * 1e3
    print(f"in-place forward+backward over 128 one-row chunks: {median_ms:.1f} ms ({rounds} runs)")


def chunk_sizes(rounds: int = 7) -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(8192, 32000, generator=generator) * 2
    target = torch.randint(0, 32000, (8192,), generator=generator)
    exponents = range(19, 26)
    times: dict[int, list[float]] = {exponent: [] for exponent in exponents}
    saved = _fused.GRADIENT_CHUNK_ELEMENTS
    try:
        for _ in range(rounds):
            for exponent in exponents:
                _fused.GRADIENT_CHUNK_ELEMENTS = 1 << exponent
                leaf = base.detach().requires_grad_()
                logits = leaf.clone()
                start = time.perf_counter()
                label_relaxation_loss(logits, target, 0.1, inplace=True).backward()  # type: ignore[no-untyped-call]
                times[exponent].append(time.perf_counter() - start)
                del logits, leaf
    finally:
        _fused.GRADIENT_CHUNK_ELEMENTS = saved
    print("in-place forward+backward at 8192x32000 by chunk size:")
    for exponent, values in times.items():
        mib = (4 << exponent) >> 20
        print(f"  {mib:2d} MiB: {statistics.median(values) * 1e3:.0f} ms")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    operator_profile()
    chunk_overhead()
    chunk_sizes()
