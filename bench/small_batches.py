"""Small batches, compiled or eager: this package against a git revision of it, in one process.

At a 64x10 batch a call costs what runs around its kernels: operator calls and Python work in
eager mode; Dynamo's guard checks, the runtime wrappers and the in-graph value check when
compiled. This script times ``F.cross_entropy``, the loss of the working tree and, with
``--baseline REV``, the loss as it was at revision ``REV`` (its ``src/label_relaxation``
exported with ``git archive`` and imported under another name, so both run in one process),
alternately: forward under ``torch.no_grad()`` and forward+backward (each call on a fresh leaf),
medians of ``--rounds`` blocks of up to 200 calls. Compiled by default (static shapes, caches
reset per shape and mode); ``--eager`` times plain calls, ``--modules`` the criteria
(``nn.CrossEntropyLoss``, ``LabelRelaxationLoss``) instead of the functions.
``--skip-guards`` times the compiled calls with
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` too, which shows what the guards
cost.

    uv run python bench/small_batches.py --baseline 17656fb
    uv run python bench/small_batches.py --shapes 64x10 --skip-guards
    THP_MEM_ALLOC_ENABLE=1 uv run python bench/small_batches.py --eager --baseline 63fc33a
    THP_MEM_ALLOC_ENABLE=1 uv run python bench/small_batches.py --eager --modules --baseline ba9addc
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import label_relaxation

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BASELINE_NAME = "label_relaxation_baseline"


def import_revision(revision: str, directory: Path) -> object:
    """``label_relaxation`` at ``revision``, importable next to this one (package renamed)."""
    archive = subprocess.run(
        ["git", "archive", revision, "src/label_relaxation"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    package = directory / BASELINE_NAME
    (directory / "src" / "label_relaxation").rename(package)
    # The package name in imports, and the operator namespace its Library registers.
    pattern = re.compile(r"\blabel_relaxation\b")
    for path in package.rglob("*.py"):
        path.write_text(pattern.sub(BASELINE_NAME, path.read_text()))
    sys.path.insert(0, str(directory))
    return importlib.import_module(BASELINE_NAME)


def per_call_us(loss: Loss, logits: torch.Tensor, target: torch.Tensor, train: bool) -> float:
    """Microseconds per call over one block of calls."""
    calls = max(5, min(200, 2_000_000 // logits.numel()))
    if train:
        leaves = [logits.clone().requires_grad_() for _ in range(calls)]
        start = time.perf_counter()
        for leaf in leaves:
            loss(leaf, target).backward()  # type: ignore[no-untyped-call]
    else:
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(calls):
                loss(logits, target)
    return (time.perf_counter() - start) / calls * 1e6


def medians(
    losses: dict[str, Loss], logits: torch.Tensor, target: torch.Tensor, train: bool, rounds: int
) -> dict[str, float]:
    """Median per-call time of each loss, the order alternating from round to round."""
    names = list(losses)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        per_call_us(losses[name], logits, target, train)  # compile and warm up
    for round_ in range(rounds):
        for name in names if round_ % 2 else names[::-1]:
            times[name].append(per_call_us(losses[name], logits, target, train))
    return {name: statistics.median(values) for name, values in times.items()}


def losses_to_time(baseline: object | None, compiled: bool, modules: bool) -> dict[str, Loss]:
    """Cross-entropy, this package and the baseline, as functions or as criteria (``modules``);
    ``torch.compile`` wrappers (static shapes) when ``compiled``."""
    losses: dict[str, Loss]
    if modules:
        losses = {
            "ce": torch.nn.CrossEntropyLoss(),
            "lr": label_relaxation.LabelRelaxationLoss(0.1),
        }
    else:
        losses = {
            "ce": lambda z, y: F.cross_entropy(z, y),
            "lr": lambda z, y: label_relaxation.label_relaxation_loss(z, y, 0.1),
        }
    if baseline is not None:
        if modules:
            losses["baseline"] = baseline.LabelRelaxationLoss(0.1)  # type: ignore[attr-defined]
        else:
            old = baseline.label_relaxation_loss  # type: ignore[attr-defined]
            losses["baseline"] = lambda z, y: old(z, y, 0.1)
    if not compiled:
        return losses
    return {name: torch.compile(loss, dynamic=False) for name, loss in losses.items()}


def report(shape: str, mode: str, times: dict[str, float]) -> None:
    cells = [f"{name} {value:8.1f} µs" for name, value in times.items()]
    ratios = [
        f"{name}/ce {value / times['ce']:.2f}" for name, value in times.items() if name != "ce"
    ]
    print(f"{shape:>9} {mode:<15} " + "  ".join(cells + ratios), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="64x10,256x100,256x1000,4096x10")
    parser.add_argument("--baseline", metavar="REV", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--skip-guards", action="store_true")
    parser.add_argument("--eager", action="store_true", help="time plain calls, not compiled")
    parser.add_argument(
        "--modules",
        action="store_true",
        help="time nn.CrossEntropyLoss and LabelRelaxationLoss instead of the functions",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        baseline = import_revision(args.baseline, Path(directory)) if args.baseline else None
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for shape in args.shapes.split(","):
            rows, classes = (int(size) for size in shape.split("x"))
            logits, target = torch.randn(rows, classes), torch.randint(0, classes, (rows,))
            for train in (False, True):
                # Fresh caches: each shape and mode is compiled on its own, statically.
                torch._dynamo.reset()
                losses = losses_to_time(baseline, not args.eager, args.modules)
                mode = ("eager " if args.eager else "") + ("module " if args.modules else "")
                mode += "fwd+bwd" if train else "fwd"
                report(shape, mode, medians(losses, logits, target, train, args.rounds))
                if args.skip_guards and not args.eager:
                    with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                        times = medians(losses, logits, target, train, args.rounds)
                    report(shape, mode + " no guards", times)


if __name__ == "__main__":
    main()
