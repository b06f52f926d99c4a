"""The calibration pipeline end to end on a tiny configuration (no claim about which loss wins)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("torchmetrics")

from label_relaxation.tools import calibration
from label_relaxation.tools.cli import main


def test_tiny_run_writes_everything_with_metrics_in_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    assert (
        main(["calibrate", "--preset", "tiny", "--alphas", "0.05,0.2", "--output", str(out)]) == 0
    )
    stdout = capsys.readouterr().out
    assert "ECE after TS" in stdout and "digits" in stdout
    assert {p.name for p in out.iterdir()} == {
        "results.json",
        "results.csv",
        "reliability-digits.png",
    }
    assert (out / "reliability-digits.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "results.json").read_text())
    assert [row["loss"] for row in data["summary"]] == ["ce", "ls", "lr"]
    for run in data["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0
        assert 0.0 <= run["ece"] <= 1.0 and 0.0 <= run["ece_temperature_scaled"] <= 1.0
        assert run["nll"] >= 0.0 and 0.0 <= run["brier"] <= 2.0
        assert run["temperature"] > 0.0
        assert (run["alpha"] is None) == (run["loss"] == "ce")
        assert run["alpha"] in (None, 0.05, 0.2)
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and {"accuracy", "ece", "brier_std"} <= set(rows[0])


def test_splits_are_disjoint_and_standardised() -> None:
    config = calibration.PRESETS["tiny"]
    split = calibration.load_split("digits", 0, config)
    sizes = [len(split.train[1]), len(split.validation[1]), len(split.test[1])]
    assert sum(sizes) == 1797 and split.num_classes == 10
    assert abs(float(split.train[0].mean())) < 0.05


def test_ece_of_a_perfectly_calibrated_predictor_is_small() -> None:
    import torch

    generator = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(torch.randn(20000, 4, generator=generator) * 2, -1)
    labels = torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
    assert calibration.expected_calibration_error(probabilities, labels) < 0.02
    wrong = torch.nn.functional.one_hot((labels + 1) % 4, 4).float()
    assert calibration.expected_calibration_error(wrong, labels) == pytest.approx(1.0)


def test_missing_dataset_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--datasets", "cifar10"])
    assert exit_info.value.code == 2
    assert "datasets must be a comma-separated subset" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "value"), [("--epochs", "0"), ("--hidden", "-3")])
def test_non_positive_sizes_are_usage_errors_naming_the_option(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", option, value])
    assert exit_info.value.code == 2
    name = option.removeprefix("--")
    assert f"{name} must be a positive integer, got '{value}'" in capsys.readouterr().err
