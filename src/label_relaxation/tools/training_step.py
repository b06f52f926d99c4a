"""Benchmark of a whole training step: the figure a user of a small classifier feels.

An MLP 64-256-256-10 (the size of scikit-learn's digits) on a batch of 64, SGD with momentum:
forward, loss, backward and optimizer step, with ``nn.CrossEntropyLoss``, label smoothing and
:class:`~label_relaxation.LabelRelaxationLoss`, eager and with the step compiled by
``torch.compile``. Data are random: a step's cost does not depend on their values. Timing
follows :mod:`label_relaxation.tools.benchmark`: blocks of steps, interleaved rounds, medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from label_relaxation.modules import LabelRelaxationLoss
from label_relaxation.tools.benchmark import BLOCK_SECONDS, MAX_CALLS, block_calls

FEATURES, HIDDEN, CLASSES, BATCH = 64, 256, 10, 64
CRITERIA = ("cross-entropy", "label smoothing", "label relaxation")
Step = Callable[[Tensor, Tensor], Tensor]


@dataclass
class StepTiming:
    """Per-step medians of one criterion, eager or compiled."""

    criterion: str
    compiled: bool
    seconds: list[float] = field(default_factory=list)
    steps_per_block: int = 1

    @property
    def median(self) -> float:
        """Median seconds per step."""
        return statistics.median(self.seconds)


def _criterion(name: str, alpha: float) -> nn.Module:
    if name == "cross-entropy":
        return nn.CrossEntropyLoss()
    if name == "label smoothing":
        return nn.CrossEntropyLoss(label_smoothing=alpha)
    return LabelRelaxationLoss(alpha)


def _make_step(name: str, alpha: float, compiled: bool) -> Step:
    """A fresh model, optimizer and criterion, and the step function that trains them."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = _criterion(name, alpha)

    def step(x: Tensor, y: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss: Tensor = criterion(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        return loss

    return torch.compile(step) if compiled else step


def _time_steps(
    step: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, steps: int
) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return (time.perf_counter() - start) / steps


def measure_training_steps(
    alpha: float,
    *,
    compiled: Sequence[bool] = (False, True),
    repeat: int = 5,
    progress: Callable[[str], None] = lambda message: None,
) -> list[StepTiming]:
    """Median time per training step for every criterion, eager and compiled.

    Each variant is warmed up (compiled ones compile there), then timed in blocks of at least
    ``BLOCK_SECONDS`` (at most ``MAX_CALLS`` steps), ``repeat`` interleaved rounds.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    variants: list[tuple[StepTiming, Step]] = []
    for is_compiled in compiled:
        for name in CRITERIA:
            progress(f"  training step, {name}{', compiled' if is_compiled else ''}: warm-up")
            step = _make_step(name, alpha, is_compiled)
            for _ in range(3):
                step(x, y)
            timing = StepTiming(name, is_compiled)
            timing.steps_per_block = block_calls(_time_steps(step, x, y, 1))
            variants.append((timing, step))
    for round_index in range(repeat):
        progress(f"  training step, round {round_index + 1}/{repeat}")
        shift = round_index % len(variants)
        for timing, step in variants[shift:] + variants[:shift]:
            timing.seconds.append(_time_steps(step, x, y, timing.steps_per_block))
    return [timing for timing, _ in variants]


def format_training_steps(timings: Sequence[StepTiming]) -> str:
    """Per-step medians, each against cross-entropy in the same mode."""
    lines = [
        f"training step: MLP {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES}, batch {BATCH}, SGD momentum "
        f"0.9 (forward, loss, backward, optimizer step; blocks of >= {BLOCK_SECONDS * 1e3:.0f} ms,"
        f" at most {MAX_CALLS} steps)",
        f"{'criterion':<18}{'mode':<10}{'per step':>12}{'vs cross-entropy':>18}",
    ]
    for timing in timings:
        baseline = next(
            t for t in timings if t.criterion == "cross-entropy" and t.compiled == timing.compiled
        )
        mode = "compiled" if timing.compiled else "eager"
        lines.append(
            f"{timing.criterion:<18}{mode:<10}{timing.median * 1e6:>9.0f} us"
            f"{timing.median / baseline.median:>17.2f}x"
        )
    return "\n".join(lines)
