"""No bad input kills the process: every loss, every mode, sizes that run on several threads.

Each (loss, mode, size) runs in a child process (``tests/bad_input_cases.py``), so that an abort
inside a compiled kernel (a C++ exception leaving an OpenMP parallel region ends the process
with SIGABRT) fails the test instead of the test run. One compiled graph per child serves all
of its bad values; the large shape, 8192x1024 on 2 threads, is where Inductor's CPU kernels run
in parallel regions. The checks under ``torch.compile`` are the point here, so the compiled
modes use real Inductor kernels.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Compiling one graph takes 5-25 s on 2 cores; the large shape's kernels well under a second.
TIMEOUT_S = 300

EXPECTED = {
    "good": None,
    "target too large": ("IndexError", r"Target \d+ is out of bounds: target must hold class"),
    "target negative": ("IndexError", "Target -5 is out of bounds: target must hold class"),
    "target equal to C": ("IndexError", r"Target \d+ is out of bounds: target must hold class"),
    "alpha out of range": ("ValueError", r"alpha must lie in the open interval \(0, 1\)"),
    "one-hot not exact": ("ValueError", "a floating target must be exactly one-hot"),
    "soft target negative": ("ValueError", "target rows must be probability distributions"),
    "soft target sum": ("ValueError", "target rows must be probability distributions"),
    "target_a too large": ("IndexError", r"out of bounds: target_a must hold class indices"),
    "target_b negative": ("IndexError", r"Target -3 is out of bounds: target_b must hold"),
    "lam out of range": ("ValueError", r"lam must lie in \[0, 1\], got a value of 1.5"),
}


def run_cases(loss: str, mode: str, rows: int, classes: int, threads: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bad_input_cases",
            loss,
            mode,
            str(rows),
            str(classes),
            str(threads),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
        env=env,
        check=False,
    )
    if completed.returncode < 0:
        name = signal.Signals(-completed.returncode).name
        pytest.fail(f"the process died of {name}:\n{completed.stderr[-3000:]}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]


def assert_expected(reports: list[dict], minimum: int) -> None:
    assert len(reports) >= minimum, reports
    for report in reports:
        expected = EXPECTED[report["case"]]
        if expected is None:
            assert "error" not in report and report["finite"], report
            continue
        error, pattern = expected
        assert report.get("error") == error, report
        assert re.search(pattern, report["message"]), report


LARGE = (8192, 1024, 2)
SMALL = (1, 7, 1)


@pytest.mark.inductor
@pytest.mark.parametrize("mode", ["compiled", "compiled-dynamic", "compiled-module"])
@pytest.mark.parametrize(("loss", "minimum"), [("index", 4), ("soft", 3), ("mixup", 4)])
def test_compiled_bad_values_raise_on_two_threads(loss: str, minimum: int, mode: str) -> None:
    assert_expected(run_cases(loss, mode, *LARGE), minimum)


@pytest.mark.inductor
def test_compiled_one_hot_target_raises_on_two_threads() -> None:
    assert_expected(run_cases("one_hot", "compiled", *LARGE), 2)


@pytest.mark.parametrize("loss", ["index", "one_hot", "soft", "mixup"])
@pytest.mark.parametrize("size", [LARGE, SMALL], ids=["8192x1024-2-threads", "1-row-1-thread"])
def test_eager_bad_values_raise(loss: str, size: tuple[int, int, int]) -> None:
    assert_expected(run_cases(loss, "eager", *size), 2)


@pytest.mark.inductor
def test_compiled_single_row_on_one_thread() -> None:
    assert_expected(run_cases("index", "compiled", *SMALL), 4)


@pytest.mark.parametrize("loss", ["index", "soft", "mixup"])
def test_vmap_bad_values_give_nan_rows_only(loss: str) -> None:
    """Under torch.func nothing can raise per sample: exactly the bad rows are NaN."""
    (report,) = run_cases(loss, "vmap", *LARGE)
    rows = LARGE[0]
    assert report["nan_rows"] == sorted({rows // 3, rows // 2})
    assert report["nan_grad_rows"] == sorted({rows // 3, rows // 2})
