"""Forward+backward per call at the sweep's small sizes, for comparing two installs of the package.

The previously published ``label-relaxation`` 0.2.1 has the same import name, so it cannot be
measured in the same process as this package: run this script once in each environment, back
to back, and compare the printed medians (cross-entropy, printed by both, shows how comparable
the two runs are). ``torch.utils.benchmark`` blocked_autorange, medians of 5 measurements of at
least 0.5 s each, every call on a fresh ``z.clone().requires_grad_()``.

    uv run python bench/peer_small.py                       # this package
    /path/to/other/venv/bin/python bench/peer_small.py      # e.g. label-relaxation==0.2.1
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import label_relaxation

SHAPES = ((64, 10), (128, 10), (256, 100), (256, 1000), (4096, 10))


def per_call_us(statement: str, names: dict[str, object]) -> float:
    timer = benchmark.Timer(statement, globals=names)
    runs = [timer.blocked_autorange(min_run_time=0.5).median for _ in range(5)]
    return statistics.median(runs) * 1e6


def main() -> None:
    torch.manual_seed(0)
    version = getattr(label_relaxation, "__version__", "?")
    print(f"label_relaxation {version} from {label_relaxation.__file__}, torch {torch.__version__}")
    for rows, classes in SHAPES:
        z = torch.randn(rows, classes) * 2
        y = torch.randint(0, classes, (rows,))
        names = {"z": z, "y": y, "F": F, "loss": label_relaxation.label_relaxation_loss}
        ce = per_call_us("x = z.clone().requires_grad_(); F.cross_entropy(x, y).backward()", names)
        lr = per_call_us("x = z.clone().requires_grad_(); loss(x, y, 0.1).backward()", names)
        print(f"{rows}x{classes}: cross-entropy {ce:.0f} us, label relaxation {lr:.0f} us")


if __name__ == "__main__":
    main()
