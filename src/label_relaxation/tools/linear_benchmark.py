"""Benchmark of the fused output layer + loss (``label-relaxation bench --hidden H``).

Variants, all forward+backward of ``(tokens, H)`` features through a ``(V, H)`` output layer:

* ``matmul-ce``: ``F.cross_entropy(F.linear(x, W), y)``, the full logits materialised;
* ``matmul-lr``: ``label_relaxation_loss(F.linear(x, W), y)``;
* ``torch-chunked``: ``F.linear_cross_entropy(..., options=nn.LinearCrossEntropyOptions())``,
  PyTorch's own chunked fused cross-entropy;
* ``fused``: :func:`~label_relaxation.linear_label_relaxation_loss`;
* ``fused-compiled``: the same inside ``torch.compile(fullgraph=True)``.

Peak memory is measured in one untimed call, by the allocator's records
(:func:`label_relaxation.tools.benchmark.peak_allocated_bytes`), less the gradients the call
returns.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from label_relaxation.functional import label_relaxation_loss
from label_relaxation.linear import linear_label_relaxation_loss
from label_relaxation.tools.benchmark import peak_allocated_bytes

LINEAR_MODES = ("matmul-ce", "matmul-lr", "torch-chunked", "fused", "fused-compiled")
INSIDE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.9)
# Rows inside the credal set get features along their target's weight row, scaled so that the
# target's logit leads the rest by this much: far inside the set for any alpha >= 1e-3 and a
# vocabulary up to ~1e6 classes.
INSIDE_MARGIN = 40.0


@dataclass
class LinearTiming:
    """Forward+backward times of one variant at one fraction of rows inside the credal set."""

    mode: str
    inside: float
    seconds: list[float] = field(default_factory=list)
    peak_extra_bytes: int | None = None
    training_fraction: float | None = None
    sweep: bool = False  # timed in the rounds over the fractions inside

    @property
    def median(self) -> float:
        """Median time in seconds."""
        return statistics.median(self.seconds)


def make_problem(
    tokens: int,
    hidden: int,
    vocab: int,
    *,
    inside: float,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Features ``(tokens, H)``, weight ``(V, H)`` and targets, a fraction ``inside`` in the set.

    The other rows have random features: their target class gets about ``1/V`` of the mass.
    """
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=generator) / hidden**0.5
    target = torch.randint(0, vocab, (tokens,), generator=generator)
    features = torch.randn(tokens, hidden, generator=generator)
    count = round(inside * tokens)
    rows = torch.randperm(tokens, generator=generator)[:count]
    direction = weight[target[rows]]
    features[rows] = INSIDE_MARGIN * direction / direction.norm(dim=1, keepdim=True) ** 2
    return (
        features.to(device, dtype).requires_grad_(),
        weight.to(device, dtype).requires_grad_(),
        target.to(device),
    )


def build_linear_variants(alpha: float) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """The benchmarked callables ``(x, W, y) -> loss``, by mode."""

    def fused(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        return linear_label_relaxation_loss(x, weight, target, alpha)

    return {
        "matmul-ce": lambda x, weight, target: F.cross_entropy(F.linear(x, weight), target),
        "matmul-lr": lambda x, weight, target: label_relaxation_loss(
            F.linear(x, weight), target, alpha
        ),
        "torch-chunked": lambda x, weight, target: F.linear_cross_entropy(
            x, weight, target, options=torch.nn.LinearCrossEntropyOptions()
        ),
        "fused": fused,
        "fused-compiled": torch.compile(fused, fullgraph=True),
    }


def _gradient_bytes(*tensors: Tensor) -> int:
    return sum(t.grad.numel() * t.grad.element_size() for t in tensors if t.grad is not None)


LinearFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _call(function: LinearFn, problem: tuple[Tensor, Tensor, Tensor]) -> None:
    x, weight, target = problem
    x.grad = weight.grad = None
    function(x, weight, target).backward()  # type: ignore[no-untyped-call]


def _timed_call(function: LinearFn, problem: tuple[Tensor, Tensor, Tensor]) -> float:
    begin = time.perf_counter()
    _call(function, problem)
    if problem[0].device.type == "cuda":
        torch.cuda.synchronize(problem[0].device)
    return time.perf_counter() - begin


def _peak_extra(function: LinearFn, problem: tuple[Tensor, Tensor, Tensor]) -> int | None:
    """Peak allocation of one call less the gradients it returns (none exist before it)."""
    x, weight, _ = problem
    x.grad = weight.grad = None
    peak = peak_allocated_bytes(lambda: _call(function, problem), x.device)
    return None if peak is None else peak - _gradient_bytes(x, weight)


def _training_fraction(alpha: float, problem: tuple[Tensor, Tensor, Tensor]) -> float:
    x, weight, target = problem
    with torch.no_grad():
        _, fraction = linear_label_relaxation_loss(
            x, weight, target, alpha, return_training_fraction=True
        )
    return float(fraction)


def measure_linear(
    tokens: int,
    hidden: int,
    vocab: int,
    *,
    alpha: float,
    dtype: torch.dtype,
    device: torch.device,
    repeat: int,
    modes: list[str],
    fractions: tuple[float, ...] = INSIDE_FRACTIONS,
    progress: Callable[[str], None] = lambda message: None,
) -> list[LinearTiming]:
    """Time every mode with all rows outside the set, then ``fused`` at each fraction inside.

    Each variant runs one untimed call (compiling, first-touch allocations), one call whose
    allocations are recorded, then ``repeat`` timed calls back to back, as the steps of a
    training loop follow each other. The fractions (all outside included) are then timed in
    ``repeat`` rounds, one call of each per round after an untimed one, so that a machine that
    slows down or speeds up during the sweep affects every fraction alike.
    """
    variants = build_linear_variants(alpha)
    sweeping = "fused" in modes and any(inside > 0 for inside in fractions)
    swept = sorted({0.0, *fractions}) if sweeping else [0.0]
    problems = _problems(tokens, hidden, vocab, swept, dtype, device)
    timings = []
    for mode in modes:
        timing = _setup(LinearTiming(mode, 0.0), variants[mode], problems[0.0], alpha)
        timing.seconds = [_timed_call(variants[mode], problems[0.0]) for _ in range(repeat)]
        _report(timing, progress)
        timings.append(timing)
    if not sweeping:
        return timings
    fused = variants["fused"]
    sweep = [LinearTiming("fused", inside, sweep=True) for inside in swept]
    for timing in sweep:
        _setup(timing, fused, problems[timing.inside], alpha)
    for _ in range(repeat):
        for timing in sweep:
            _call(fused, problems[timing.inside])
            timing.seconds.append(_timed_call(fused, problems[timing.inside]))
    for timing in sweep:
        _report(timing, progress)
    return timings + sweep


def _setup(
    timing: LinearTiming, function: LinearFn, problem: tuple[Tensor, Tensor, Tensor], alpha: float
) -> LinearTiming:
    """Training fraction, an untimed call (compiling, first touches) and the peak memory."""
    timing.training_fraction = _training_fraction(alpha, problem)
    _call(function, problem)
    timing.peak_extra_bytes = _peak_extra(function, problem)
    return timing


def _report(timing: LinearTiming, progress: Callable[[str], None]) -> None:
    progress(
        f"  {timing.mode:15s} inside {timing.inside:4.0%}: {timing.median * 1e3:9.1f} ms, "
        f"extra {_mib(timing.peak_extra_bytes)}" + (" (fraction sweep)" if timing.sweep else "")
    )


def _problems(
    tokens: int,
    hidden: int,
    vocab: int,
    fractions: list[float],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[float, tuple[Tensor, Tensor, Tensor]]:
    """One problem per fraction inside, all holding the first one's weight.

    The weights are equal anyway (the same seed draws them); sharing keeps one ``(V, H)``
    weight in memory, not one per fraction.
    """
    problems = {}
    shared_weight = None
    for inside in fractions:
        x, weight, target = make_problem(
            tokens, hidden, vocab, inside=inside, dtype=dtype, device=device
        )
        shared_weight = weight if shared_weight is None else shared_weight
        problems[inside] = (x, shared_weight, target)
    return problems


def _mib(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 2**20:.1f} MiB"


def format_linear_table(timings: list[LinearTiming], shape: tuple[int, int, int]) -> str:
    """Markdown tables: variants with all rows outside the set, then the fused loss by fraction."""
    tokens, hidden, vocab = shape
    outside = {t.mode: t for t in timings if not t.sweep}
    lines = [
        f"(tokens, H, V) = ({tokens}, {hidden}, {vocab}); logits would be "
        f"{tokens * vocab * 4 / 2**20:.0f} MiB in float32; every row outside the credal set",
        "",
        "| variant | median fwd+bwd | extra memory | time / fused | time / torch-chunked |",
        "|---|---:|---:|---:|---:|",
    ]
    fused = outside.get("fused")
    chunked = outside.get("torch-chunked")
    for mode, timing in outside.items():
        to_fused = f"{timing.median / fused.median:.2f}x" if fused else ""
        to_chunked = f"{timing.median / chunked.median:.2f}x" if chunked else ""
        lines.append(
            f"| {mode} | {timing.median * 1e3:.0f} ms | {_mib(timing.peak_extra_bytes)} | "
            f"{to_fused} | {to_chunked} |"
        )
    sweep = [t for t in timings if t.sweep]
    if sweep:
        all_outside = sweep[0]
        lines += [
            "",
            "| rows inside the set | training fraction | median fwd+bwd | time / all outside |",
            "|---:|---:|---:|---:|",
        ]
        for timing in sweep:
            lines.append(
                f"| {timing.inside:.0%} | {timing.training_fraction:.2f} | "
                f"{timing.median * 1e3:.0f} ms | {timing.median / all_outside.median:.2f}x |"
            )
    return "\n".join(lines)


def linear_json(timings: list[LinearTiming]) -> list[dict[str, Any]]:
    """Raw timings for ``--json``."""
    return [
        {
            "mode": t.mode,
            "inside": t.inside,
            "seconds": t.seconds,
            "median_s": t.median,
            "peak_extra_bytes": t.peak_extra_bytes,
            "training_fraction": t.training_fraction,
            "fraction_sweep": t.sweep,
        }
        for t in timings
    ]
