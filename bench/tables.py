"""Markdown tables for the README and docs from the JSON of ``label-relaxation bench --json``.

Run from the repository root: ``uv run python bench/tables.py BENCH.json``.
Prints, per shape, medians with the forward+backward range across rounds, ratios to eager
cross-entropy, peak extra memory as a multiple of the logits' size, and compiled label
relaxation against compiled cross-entropy; nothing is typed in by hand. ``--plot PATH`` also
draws the bar chart of ``label-relaxation bench --plot`` from the same figures.

``--sweep A.json B.json`` takes two invocations of ``label-relaxation bench --sweep --json`` and
prints one row per shape with each ratio from both runs and the worse of the two, then the
training-step table of both; ``--plot`` then draws the sweep chart of the first run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from label_relaxation.tools import benchmark

TIMES = "\u00d7"  # the tables' multiplication sign
EN_DASH = "\u2013"


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}{TIMES}"


def table(result: dict[str, Any]) -> str:
    measured = {m["variant"]: m for m in result["measurements"] if m["error"] is None}
    ce = measured["ce"]
    base_forward = statistics.median(ce["forward_s"])
    base_train = statistics.median(ce["train_s"])
    shape = "x".join(str(size) for size in result["shape"])
    lines = [
        f"**{shape} {result['dtype']}** ({result['logits_bytes'] / 2**20:.0f} MiB of logits)",
        "",
        "| variant | forward ms | vs eager CE | forward+backward ms | vs eager CE "
        "| peak extra memory |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in measured.items():
        forward = statistics.median(m["forward_s"])
        train = statistics.median(m["train_s"])
        low, high = min(m["train_s"]) * 1e3, max(m["train_s"]) * 1e3
        memory = m["peak_extra_bytes"] / result["logits_bytes"]
        lines.append(
            f"| `{name}` | {forward * 1e3:.0f} | {ratio(forward, base_forward)} "
            f"| {train * 1e3:.0f} ({low:.0f}{EN_DASH}{high:.0f}) | {ratio(train, base_train)} "
            f"| {memory:.2f}{TIMES} |"
        )
    if "lr-compiled" in measured and "ce-compiled" in measured:
        compiled = ratio(
            statistics.median(measured["lr-compiled"]["train_s"]),
            statistics.median(measured["ce-compiled"]["train_s"]),
        )
        lines += [
            "",
            "Compiled label relaxation against compiled cross-entropy, forward+backward: "
            f"**{compiled}**.",
        ]
    return "\n".join(lines)


def shape_results(data: dict[str, Any]) -> list[benchmark.ShapeResult]:
    """The benchmark's own result objects, rebuilt from its JSON."""
    results = []
    for result in data["results"]:
        measurements = [
            benchmark.Measurement(
                **{k: v for k, v in m.items() if k not in ("forward_median_s", "train_median_s")}
            )
            for m in result["measurements"]
        ]
        fields = {k: v for k, v in result.items() if k != "measurements"}
        fields["shape"] = tuple(fields["shape"])
        results.append(benchmark.ShapeResult(**fields, measurements=measurements))
    return results


SWEEP_COLUMNS = (
    ("lr", "eager fwd+bwd"),
    ("lr-module", "module fwd+bwd"),
    ("lr-compiled/ce-compiled", "compiled fwd+bwd vs compiled CE"),
    ("lr fwd", "eager forward"),
    ("lr-compiled/ce-compiled fwd", "compiled forward vs compiled CE"),
)


def sweep_table(runs: list[dict[str, Any]]) -> str:
    """Ratios per shape from every run, ``a / b (worse)``; ratios are to eager CE unless named."""
    header = "| logits | CE fwd+bwd | " + " | ".join(title for _, title in SWEEP_COLUMNS) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(SWEEP_COLUMNS)]
    results = [shape_results(run) for run in runs]
    for index, first in enumerate(results[0]):
        per_run = [benchmark.sweep_ratios(run[index]) for run in results]
        ce_medians = [benchmark.median_of(run[index], "ce", "train") for run in results]
        ce_times = [benchmark.format_duration(median) for median in ce_medians]
        cells = []
        for key, _ in SWEEP_COLUMNS:
            values = [ratios.get(key) for ratios in per_run]
            if any(value is None for value in values):
                cells.append("-")
                continue
            shown = " / ".join(f"{value:.2f}" for value in values if value is not None)
            worse = max(value for value in values if value is not None)
            cells.append(f"{shown} (**{worse:.2f}{TIMES}**)")
        shape = "x".join(str(size) for size in first.shape)
        lines.append(f"| {shape} | {' / '.join(ce_times)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_table(runs: list[dict[str, Any]]) -> str:
    """The training-step medians of every run, against cross-entropy in the same mode."""
    lines = ["| criterion | mode | per step | vs cross-entropy |", "|---|---|---:|---:|"]
    steps = [run["training_step"] for run in runs]
    for index, timing in enumerate(steps[0]):
        mode = "compiled" if timing["compiled"] else "eager"
        times, ratios = [], []
        for run in steps:
            this = run[index]
            base = next(
                t
                for t in run
                if t["criterion"] == "cross-entropy" and t["compiled"] == this["compiled"]
            )
            times.append(f"{this['median_s'] * 1e6:.0f} µs")
            ratios.append(this["median_s"] / base["median_s"])
        shown = " / ".join(f"{r:.2f}" for r in ratios)
        lines.append(
            f"| {timing['criterion']} | {mode} | {' / '.join(times)} "
            f"| {shown} (**{max(ratios):.2f}{TIMES}**) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="output of label-relaxation bench --json")
    parser.add_argument("--plot", metavar="PATH", help="also draw the bench's chart")
    parser.add_argument("--sweep", action="store_true", help="sweep tables from several runs")
    args = parser.parse_args()
    runs = []
    for path in args.json:
        with open(path) as handle:
            runs.append(json.load(handle))
    if args.sweep:
        for run in runs:
            print(f"<!-- {run['settings']['command']}; torch {run['machine']['torch']} -->")
        print(sweep_table(runs))
        print()
        print(step_table(runs))
        if args.plot:
            benchmark.plot_sweep(shape_results(runs[0]), args.plot)
        return
    data = runs[0]
    print(f"<!-- {data['settings']['command']}; torch {data['machine']['torch']} -->")
    for result in data["results"]:
        print()
        print(table(result))
    if args.plot:
        benchmark.plot(shape_results(data), args.plot)


if __name__ == "__main__":
    main()
