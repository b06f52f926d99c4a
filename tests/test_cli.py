"""Smoke tests of the benchmark CLI on tiny shapes (no timing assertions)."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from label_relaxation.tools import benchmark, training_step
from label_relaxation.tools.cli import main

FAST_MODES = "ce,ls,lr,lr-inplace,lr-reference,floor"


def test_bench_writes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--shapes",
            "16x10,2x3x7",
            "--repeat",
            "2",
            "--modes",
            FAST_MODES,
            "--json",
            str(path),
        ]
    )
    assert code == 0
    out, err = capsys.readouterr()
    assert "fwd+bwd vs ce" in out and "THP_MEM_ALLOC_ENABLE" in out
    assert "round 2/2" in err and "round 1/2" not in out
    data = json.loads(path.read_text())
    assert data["machine"]["torch"] == torch.__version__
    assert data["settings"]["modes"] == FAST_MODES.split(",")
    assert [r["shape"] for r in data["results"]] == [[16, 10], [2, 3, 7]]
    for result in data["results"]:
        assert result["logits_bytes"] == 4 * int(torch.tensor(result["shape"]).prod())
        names = [m["variant"] for m in result["measurements"]]
        assert names == FAST_MODES.split(",")
        for m in result["measurements"]:
            assert m["error"] is None
            assert len(m["forward_s"]) == 2 and len(m["train_s"]) == 2
            assert all(t > 0 for t in m["forward_s"] + m["train_s"])
            assert m["train_median_s"] == statistics.median(m["train_s"])
        peak = {m["variant"]: m["peak_extra_bytes"] for m in result["measurements"]}
        assert peak["lr-inplace"] < peak["lr"] <= peak["ce"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "8192"], "at least two positive sizes"),
        (["--shapes", "axb"], "sizes joined by 'x'"),
        (["--modes", "lr,fast"], "modes must be a comma-separated subset"),
        (["--alpha", "1.5"], r"alpha must lie in \(0, 1\)"),
        (["--repeat", "0"], "repeat must be a positive integer"),
        (["--dtype", "int8"], "invalid choice"),
    ],
)
def test_bad_arguments_give_usage_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert re.search(message, err)


def test_a_failing_variant_is_reported_and_the_run_goes_on() -> None:
    def broken(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise MemoryError("out of memory (simulated)")

    variants = [
        *benchmark.build_variants(0.1, ["ce"]),
        benchmark.Variant("broken", "raises", broken),
    ]
    result = benchmark.measure_shape(
        (8, 5),
        variants,
        dtype=torch.float32,
        device=torch.device("cpu"),
        repeat=1,
        progress=lambda _: None,
    )
    ce, failed = result.measurements
    assert ce.error is None and len(ce.train_s) == 1
    assert failed.error == "MemoryError: out of memory (simulated)" and failed.train_s == []
    assert "failed: MemoryError: out of memory (simulated)" in benchmark.format_table(result)


def count_calls(warm_memory: bool, repeat: int = 3) -> tuple[benchmark.Measurement, list[bool]]:
    """Run one counted variant; return its measurement and, per call, whether grad was on."""
    calls: list[bool] = []

    def counted(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return torch.nn.functional.cross_entropy(logits, target)

    variant = benchmark.Variant("counted", "cross-entropy, counted", counted)
    result = benchmark.measure_shape(
        (8, 5),
        [variant],
        dtype=torch.float32,
        device=torch.device("cpu"),
        repeat=repeat,
        progress=lambda _: None,
        warm_memory=warm_memory,
    )
    (measurement,) = result.measurements
    return measurement, calls


# warm-up: one forward, one forward+backward, one of each to size the blocks, one memory run
WARM_UP_CALLS = 5


@pytest.mark.parametrize(("warm_memory", "calls_per_timing"), [(True, 2), (False, 1)])
def test_each_timed_single_call_follows_an_untimed_one_unless_cold(
    monkeypatch: pytest.MonkeyPatch, warm_memory: bool, calls_per_timing: int
) -> None:
    monkeypatch.setattr(benchmark, "BLOCK_SECONDS", 0.0)  # every timing is a single call
    repeat = 3
    measurement, calls = count_calls(warm_memory, repeat)
    assert measurement.forward_calls == measurement.train_calls == 1
    assert len(measurement.forward_s) == len(measurement.train_s) == repeat
    timed = calls[WARM_UP_CALLS:]
    assert len(timed) == 2 * repeat * calls_per_timing
    assert sum(not grad for grad in timed) == repeat * calls_per_timing


def test_fast_calls_are_timed_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call much shorter than BLOCK_SECONDS is timed over a block of MAX_CALLS calls, which
    is its own warm-up: no untimed call before it."""
    monkeypatch.setattr(benchmark, "BLOCK_SECONDS", 10.0)
    monkeypatch.setattr(benchmark, "MAX_CALLS", 4)
    repeat = 3
    measurement, calls = count_calls(True, repeat)
    assert measurement.forward_calls == measurement.train_calls == 4
    timed = calls[WARM_UP_CALLS:]
    assert len(timed) == 2 * repeat * 4
    assert sum(not grad for grad in timed) == repeat * 4
    assert all(0 < t < 1 for t in measurement.forward_s + measurement.train_s)


def test_cold_memory_flag_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bench.json"
    args = ["bench", "--shapes", "8x6", "--repeat", "1", "--modes", "ce,lr", "--json", str(path)]
    assert main([*args, "--cold-memory"]) == 0
    assert "--cold-memory" in capsys.readouterr().out
    assert json.loads(path.read_text())["settings"]["warm_memory"] is False
    assert main(args) == 0
    assert "each timed call follows an untimed one" in capsys.readouterr().out
    assert json.loads(path.read_text())["settings"]["warm_memory"] is True


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert (
        main(["bench", "--shapes", "8x6", "--repeat", "1", "--modes", "ce,lr", "--plot", str(path)])
        == 0
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_entry_point() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "label_relaxation", "bench", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--shapes" in completed.stdout and "--plot" in completed.stdout


def test_sweep_table_reports_ratios_from_the_same_run() -> None:
    def measurement(name: str, forward: float, train: float) -> benchmark.Measurement:
        return benchmark.Measurement(name, name, forward_s=[forward], train_s=[train])

    result = benchmark.ShapeResult(
        shape=(64, 10),
        dtype="float32",
        device="cpu",
        logits_bytes=2560,
        measurements=[
            measurement("ce", 10e-6, 50e-6),
            measurement("lr", 30e-6, 100e-6),
            measurement("ce-compiled", 20e-6, 80e-6),
            measurement("lr-compiled", 25e-6, 60e-6),
        ],
    )
    ratios = benchmark.sweep_ratios(result)
    assert ratios["lr"] == pytest.approx(2.0) and ratios["lr fwd"] == pytest.approx(3.0)
    assert ratios["lr-compiled/ce-compiled"] == pytest.approx(0.75)
    assert ratios["lr-compiled/ce-compiled fwd"] == pytest.approx(1.25)
    table = benchmark.format_sweep_table([result])
    assert "64x10" in table and "50 us" in table and "2.00x" in table and "0.75x" in table


def test_training_step_benchmark_eager() -> None:
    timings = training_step.measure_training_steps(0.1, compiled=(False,), repeat=2)
    assert [t.criterion for t in timings] == list(training_step.CRITERIA)
    assert all(len(t.seconds) == 2 and t.median > 0 for t in timings)
    text = training_step.format_training_steps(timings)
    assert "label relaxation  eager" in text and "1.00x" in text


def test_hidden_benchmarks_the_fused_linear_loss(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "linear.json"
    code = main(
        [
            "bench",
            "--hidden",
            "32",
            "--shapes",
            "64x50",
            "--repeat",
            "2",
            "--modes",
            "matmul-lr,torch-chunked,fused",
            "--json",
            str(path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| fused | " in out and "| torch-chunked | " in out
    assert "| 50% | 0.50 |" in out  # half the rows inside the set: half still train
    data = json.loads(path.read_text())
    assert data["settings"]["hidden"] == 32
    timings = data["results"][0]["timings"]
    assert [t["mode"] for t in timings][:3] == ["matmul-lr", "torch-chunked", "fused"]
    for timing in timings:
        assert len(timing["seconds"]) == 2
        assert timing["median_s"] == statistics.median(timing["seconds"])
    inside = {t["inside"]: t["training_fraction"] for t in timings if t["mode"] == "fused"}
    assert inside == {0.0: 1.0, 0.25: 0.75, 0.5: 0.5, 0.75: 0.25, 0.9: pytest.approx(0.09375)}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "2x3x4"], "--shapes must be TOKENSxV"),
        (["--modes", "lr"], "modes must be a comma-separated subset of matmul-ce"),
        (["--sweep"], "--hidden cannot be combined"),
    ],
)
def test_hidden_argument_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--hidden", "8", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
