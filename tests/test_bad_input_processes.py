"""No bad input kills the process: every loss, every mode, sizes that run on several threads.

Each (loss, mode, size) runs in a child process (``tests/bad_input_cases.py``), so that an abort
inside a compiled kernel (a C++ exception leaving an OpenMP parallel region ends the process
with SIGABRT) fails the test instead of the test run. A few of them share a child, one after
another, since starting one costs 15-20 s on 2 cores; if it dies, every one that had not
finished fails with the signal. One compiled graph per (loss, mode, size) serves all of its bad
values; the large shape, 8192x1024 on 2 threads, is where Inductor's CPU kernels run in parallel
regions. The checks under ``torch.compile`` are the point here, so the compiled
modes use real Inductor kernels.
"""

from __future__ import annotations

import functools
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


Spec = tuple[str, str, int, int, int]  # loss, mode, rows, classes, threads


@functools.cache
def run_group(specs: tuple[Spec, ...]) -> tuple[dict[Spec, list[dict]], str | None]:
    """Run ``specs`` in one child process: each finished spec's reports, and how it ended.

    The second item is ``None`` for a clean exit, else what went wrong (a signal, an exception,
    the timeout) with the end of the child's stderr.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [",".join(str(part) for part in spec) for spec in specs]
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "tests.bad_input_cases", *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S * len(specs),
            cwd=ROOT,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else ""
        return _finished(stdout, specs), f"timed out after {expired.timeout} s"
    failure = None
    if completed.returncode < 0:
        name = signal.Signals(-completed.returncode).name
        failure = f"the process died of {name}:\n{completed.stderr[-3000:]}"
    elif completed.returncode != 0:
        failure = f"exit code {completed.returncode}:\n{completed.stderr[-3000:]}"
    return _finished(completed.stdout, specs), failure


def _finished(stdout: str, specs: tuple[Spec, ...]) -> dict[Spec, list[dict]]:
    """The reports of each spec that printed its done line."""
    by_arg = {",".join(str(part) for part in spec): spec for spec in specs}
    finished: dict[Spec, list[dict]] = {}
    current: list[dict] = []
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        report = json.loads(line)
        if "spec" in report:
            current = []
        elif "done" in report:
            finished[by_arg[report["done"]]] = current
        else:
            current.append(report)
    return finished


def run_cases(group: tuple[Spec, ...], spec: Spec) -> list[dict]:
    """The reports of ``spec``, run with the rest of ``group`` in one child process."""
    assert spec in group
    finished, failure = run_group(group)
    if spec not in finished:
        pytest.fail(f"{spec} did not finish; {failure or 'no report'}")
    return finished[spec]


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
COMPILED_MODES = ("compiled", "compiled-dynamic", "compiled-module")
# One child process per group: each compiled group holds the modes of one loss.
COMPILED_GROUPS = {
    "index": (
        *[("index", mode, *LARGE) for mode in COMPILED_MODES],
        ("index", "compiled", *SMALL),
    ),
    "soft": tuple(("soft", mode, *LARGE) for mode in COMPILED_MODES),
    "mixup": (
        *[("mixup", mode, *LARGE) for mode in COMPILED_MODES],
        ("one_hot", "compiled", *LARGE),
    ),
}
EAGER_GROUP = tuple(
    (loss, "eager", *size)
    for loss in ("index", "one_hot", "soft", "mixup")
    for size in (LARGE, SMALL)
)
VMAP_GROUP = tuple((loss, "vmap", *LARGE) for loss in ("index", "soft", "mixup"))


@pytest.mark.inductor
@pytest.mark.parametrize("mode", COMPILED_MODES)
@pytest.mark.parametrize(("loss", "minimum"), [("index", 4), ("soft", 3), ("mixup", 4)])
def test_compiled_bad_values_raise_on_two_threads(loss: str, minimum: int, mode: str) -> None:
    assert_expected(run_cases(COMPILED_GROUPS[loss], (loss, mode, *LARGE)), minimum)


@pytest.mark.inductor
def test_compiled_one_hot_target_raises_on_two_threads() -> None:
    assert_expected(run_cases(COMPILED_GROUPS["mixup"], ("one_hot", "compiled", *LARGE)), 2)


@pytest.mark.parametrize("loss", ["index", "one_hot", "soft", "mixup"])
@pytest.mark.parametrize("size", [LARGE, SMALL], ids=["8192x1024-2-threads", "1-row-1-thread"])
def test_eager_bad_values_raise(loss: str, size: tuple[int, int, int]) -> None:
    assert_expected(run_cases(EAGER_GROUP, (loss, "eager", *size)), 2)


@pytest.mark.inductor
def test_compiled_single_row_on_one_thread() -> None:
    assert_expected(run_cases(COMPILED_GROUPS["index"], ("index", "compiled", *SMALL)), 4)


@pytest.mark.parametrize("loss", ["index", "soft", "mixup"])
def test_vmap_bad_values_give_nan_rows_only(loss: str) -> None:
    """Under torch.func nothing can raise per sample: exactly the bad rows are NaN."""
    (report,) = run_cases(VMAP_GROUP, (loss, "vmap", *LARGE))
    rows = LARGE[0]
    assert report["nan_rows"] == sorted({rows // 3, rows // 2})
    assert report["nan_grad_rows"] == sorted({rows // 3, rows // 2})
