"""Markdown tables for the README and docs from the JSON of ``label-relaxation bench --json``.

Run from the repository root: ``uv run python bench/tables.py docs/_static/bench-cpu.json``.
Prints, per shape, medians with the forward+backward range across rounds, ratios to eager
cross-entropy, peak extra memory as a multiple of the logits' size, and compiled label
relaxation against compiled cross-entropy; nothing is typed in by hand. ``--plot PATH`` also
draws the bar chart of ``label-relaxation bench --plot`` from the same figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from label_relaxation import benchmark

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="output of label-relaxation bench --json")
    parser.add_argument("--plot", metavar="PATH", help="also draw the bench's bar chart")
    args = parser.parse_args()
    with open(args.json) as handle:
        data = json.load(handle)
    print(f"<!-- {data['settings']['command']}; torch {data['machine']['torch']} -->")
    for result in data["results"]:
        print()
        print(table(result))
    if args.plot:
        benchmark.plot(shape_results(data), args.plot)


if __name__ == "__main__":
    main()
