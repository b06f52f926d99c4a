"""Benchmark harness: label relaxation against cross-entropy baselines, eager and compiled.

Method (used by ``label-relaxation bench`` and described in the docs):

* every variant gets its own copy of the logits, made outside the timed region, so in-place
  variants start from the same values and gradients flow into a non-leaf as in a model;
* each variant runs once untimed first (warm-up; compiled variants compile there, and that
  first call's duration is reported separately as compile time);
* then ``repeat`` rounds, each timing every variant's forward pass once, then every variant's
  forward+backward pass once (interleaved, so drifts in machine state hit all variants alike;
  the order rotates from round to round, so no variant always follows the same neighbour);
  the table reports medians;
* a timing is a block of calls lasting at least ``BLOCK_SECONDS`` (one call where one call
  takes longer; the count is set from a call timed after the warm-up), reported per call, so
  that a 64x10 batch taking microseconds is timed over thousands of calls;
  forward+backward calls each get a fresh copy of the logits, made before the block;
* on the CPU every timed single call directly follows an untimed call of the same variant, as
  one step of a training loop follows another (``--cold-memory`` leaves it out; a block of
  calls is its own warm-up). Memory freed a
  moment ago is cheap to reuse, but on virtual machines with free page reporting
  (virtio-balloon) memory left free for about 2 s goes back to the host and costs ~1-2 s per
  GiB at its next first touch instead of ~0.1 s; between interleaved rounds that would charge
  each variant for how long the others ran (measured by ``bench/fresh_memory.py``);
* on CUDA every timing is bracketed by ``torch.cuda.synchronize()``;
* peak extra memory is the largest amount the variant holds above what existed before its
  call: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the running sum of the
  allocator's events recorded by ``torch.profiler`` (``profile_memory=True``), in a separate
  untimed call.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from label_relaxation.functional import label_relaxation_loss
from label_relaxation.modules import LabelRelaxationLoss

LossFn = Callable[[Tensor, Tensor], Tensor]
# The sweep of `label-relaxation bench --sweep`: classification batches where operator calls
# dominate, up to 1 GiB of language-model logits where passes over memory dominate.
SWEEP_SHAPES = (
    (64, 10),
    (128, 10),
    (256, 100),
    (256, 1000),
    (4096, 10),
    (65536, 10),
    (16384, 1000),
    (4096, 32000),
    (8192, 32000),
    (2048, 128256),
)
SWEEP_MODES = ("ce", "ce-compiled", "lr", "lr-module", "lr-compiled")
# A timed measurement runs a block of calls lasting at least this long (one call where a call
# takes longer), so that microsecond calls are timed over many calls, as torch.utils.benchmark's
# blocked_autorange does.
BLOCK_SECONDS = 0.02
MAX_CALLS = 5000
MODES = (
    "ce",
    "ce-compiled",
    "ls",
    "ls-compiled",
    "lr",
    "lr-module",
    "lr-compiled",
    "lr-inplace",
    "lr-reference",
    "floor",
)


@dataclass
class Variant:
    """One row of the table: how to compute the loss, and what it is compared against."""

    name: str
    description: str
    loss: LossFn
    compiled: bool = False
    inplace: bool = False
    floor: bool = False


@dataclass
class Measurement:
    """Raw timings (seconds) and memory of one variant at one shape."""

    variant: str
    description: str
    forward_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    compile_s: float | None = None
    peak_extra_bytes: int | None = None
    error: str | None = None
    forward_calls: int = 1  # calls per timed block
    train_calls: int = 1

    @property
    def forward_median(self) -> float | None:
        """Median forward time, or ``None`` if the variant did not run."""
        return statistics.median(self.forward_s) if self.forward_s else None

    @property
    def train_median(self) -> float | None:
        """Median forward+backward time, or ``None`` if the variant did not run."""
        return statistics.median(self.train_s) if self.train_s else None


@dataclass
class ShapeResult:
    """All variants measured at one logits shape."""

    shape: tuple[int, ...]
    dtype: str
    device: str
    logits_bytes: int
    measurements: list[Measurement]


def _floor_loss(logits: Tensor, target: Tensor) -> Tensor:
    """One read pass over the logits; its backward writes one full-size gradient."""
    del target
    return logits.sum()


def build_variants(alpha: float, modes: Sequence[str]) -> list[Variant]:
    """The variants named in ``modes``, in the table's order."""

    def ce(z: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(z.flatten(0, -2), y.flatten())

    def ls(z: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(z.flatten(0, -2), y.flatten(), label_smoothing=alpha)

    def lr(z: Tensor, y: Tensor) -> Tensor:
        return label_relaxation_loss(z, y, alpha)

    criterion = LabelRelaxationLoss(alpha)

    def lr_inplace(z: Tensor, y: Tensor) -> Tensor:
        return label_relaxation_loss(z, y, alpha, inplace=True)

    def lr_reference(z: Tensor, y: Tensor) -> Tensor:
        return label_relaxation_loss(z, y, alpha, implementation="reference")

    def compiled(fn: LossFn) -> LossFn:
        return torch.compile(fn, fullgraph=True, dynamic=False)

    catalogue = {
        "ce": lambda: Variant("ce", "F.cross_entropy, eager", ce),
        "ce-compiled": lambda: Variant(
            "ce-compiled", "F.cross_entropy, torch.compile", compiled(ce), compiled=True
        ),
        "ls": lambda: Variant("ls", f"cross-entropy, label_smoothing={alpha}, eager", ls),
        "ls-compiled": lambda: Variant(
            "ls-compiled", f"cross-entropy, label_smoothing={alpha}, compiled", compiled(ls), True
        ),
        "lr": lambda: Variant("lr", "label relaxation, eager (fused)", lr),
        "lr-module": lambda: Variant("lr-module", "LabelRelaxationLoss module, eager", criterion),
        "lr-compiled": lambda: Variant(
            "lr-compiled", "label relaxation, torch.compile", compiled(lr), compiled=True
        ),
        "lr-inplace": lambda: Variant(
            "lr-inplace", "label relaxation, eager, inplace=True", lr_inplace, inplace=True
        ),
        "lr-reference": lambda: Variant(
            "lr-reference", "label relaxation, pure formulation, eager", lr_reference
        ),
        "floor": lambda: Variant(
            "floor", "one read pass (backward: one write)", _floor_loss, floor=True
        ),
    }
    return [catalogue[mode]() for mode in modes]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_forward(variant: Variant, logits: Tensor, target: Tensor, calls: int = 1) -> float:
    """Seconds per call of a block of ``calls`` forward calls under ``torch.no_grad()``."""
    device = logits.device
    _synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(calls):
            variant.loss(logits, target)
    _synchronize(device)
    return (time.perf_counter() - start) / calls


def _time_train(variant: Variant, base: Tensor, target: Tensor, calls: int = 1) -> float:
    """Seconds per forward+backward call, each on a fresh non-leaf copy (copies not timed)."""
    leaves = [base.detach().requires_grad_() for _ in range(calls)]
    copies = [leaf.clone() for leaf in leaves]
    device = base.device
    _synchronize(device)
    start = time.perf_counter()
    for logits in copies:
        variant.loss(logits, target).backward()  # type: ignore[no-untyped-call]
    _synchronize(device)
    elapsed = time.perf_counter() - start
    del copies, leaves
    return elapsed / calls


def block_calls(seconds_per_call: float) -> int:
    """How many calls make one timed block (``BLOCK_SECONDS``)."""
    if seconds_per_call <= 0:
        return MAX_CALLS
    return max(1, min(MAX_CALLS, math.ceil(BLOCK_SECONDS / seconds_per_call)))


# What the profiler's C++ side (kineto) prints on a machine without a GPU, straight to file
# descriptor 2: "USDT:... profiler_start/profiler_stop" and "ERROR:... gpuGetDeviceCount failed".
_PROFILER_NOISE = re.compile(r"^(USDT:.*profiler_(start|stop)|ERROR:.*gpuGetDeviceCount failed)")


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Drop exactly the profiler's start/stop and GPU-probe lines from stderr; keep the rest.

    They come from C++ on file descriptor 2, so ``sys.stderr`` cannot filter them: the
    descriptor is pointed at a temporary file for the duration, and every other line is
    written back afterwards.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            kept = [line for line in text.splitlines(True) if not _PROFILER_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))


def peak_allocated_bytes(call: Callable[[], object], device: torch.device) -> int | None:
    """Largest amount allocated above the starting point while ``call()`` runs.

    On CUDA the caching allocator's peak; on the CPU the allocator's events recorded by
    ``torch.profiler`` (``profile_memory=True``), so the figure does not depend on how the C
    library hands memory back to the system. ``None`` where the profiler records no events.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with (
        quiet_profiler(),
        torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as profiler,
    ):
        call()
    results = getattr(profiler.profiler, "kineto_results", None)
    if results is None:
        return None
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in results.events()
        if event.name() == "[memory]"
    )
    running = itertools.accumulate(nbytes for _, nbytes in events)
    return max(0, max(running, default=0))


def _peak_extra_bytes(variant: Variant, base: Tensor, target: Tensor) -> int | None:
    """Largest allocation above the starting point during one forward+backward."""
    logits = base.detach().requires_grad_().clone()

    def call() -> None:
        variant.loss(logits, target).backward()  # type: ignore[no-untyped-call]

    return peak_allocated_bytes(call, base.device)


def _error_text(error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}"[:200]


def measure_shape(
    shape: tuple[int, ...],
    variants: Sequence[Variant],
    *,
    dtype: torch.dtype,
    device: torch.device,
    repeat: int,
    progress: Callable[[str], None],
    seed: int = 0,
    warm_memory: bool = True,
) -> ShapeResult:
    """Measure every variant at one shape: warm-up, interleaved timed rounds, memory.

    ``warm_memory``: on the CPU, precede every timed call by an untimed one (module docstring).
    """
    warm_memory = warm_memory and device.type == "cpu"
    generator = torch.Generator(device="cpu").manual_seed(seed)
    base = (torch.randn(shape, generator=generator) * 2).to(device=device, dtype=dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=generator).to(device)
    results = {v.name: Measurement(v.name, v.description) for v in variants}
    live = []
    for variant in variants:
        progress(f"  {variant.name}: warm-up{' and compile' if variant.compiled else ''}")
        result = results[variant.name]
        try:
            started = time.perf_counter()
            _time_forward(variant, base, target)
            _time_train(variant, base, target)
            if variant.compiled:
                result.compile_s = time.perf_counter() - started
            result.forward_calls = block_calls(_time_forward(variant, base, target))
            result.train_calls = block_calls(_time_train(variant, base, target))
            result.peak_extra_bytes = _peak_extra_bytes(variant, base, target)
            live.append(variant)
        except Exception as error:  # a failed variant is reported; the run goes on
            result.error = _error_text(error)
            progress(f"  {variant.name}: failed ({result.error})")
    for round_index in range(repeat):
        progress(f"  round {round_index + 1}/{repeat}")
        # Forward passes of all variants first, then forward+backward passes: a forward timing
        # never follows directly on the large frees that end another variant's backward.
        # The order rotates every round, so that each variant takes each position equally.
        shift = round_index % max(len(live), 1)
        order = live[shift:] + live[:shift]
        for timer, kind in ((_time_forward, "forward"), (_time_train, "train")):
            for variant in order:
                result = results[variant.name]
                if result.error is not None:
                    continue
                calls = getattr(result, f"{kind}_calls")
                try:
                    if warm_memory and calls == 1:
                        timer(variant, base, target)  # untimed: the loop's previous step
                    getattr(result, f"{kind}_s").append(timer(variant, base, target, calls))
                except Exception as error:
                    result.error = _error_text(error)
    return ShapeResult(
        shape=tuple(shape),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        logits_bytes=base.numel() * base.element_size(),
        measurements=[results[v.name] for v in variants],
    )


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    thp_path = "/sys/kernel/mm/transparent_hugepage/enabled"
    thp_kernel = None
    if os.path.exists(thp_path):
        with open(thp_path) as handle:
            thp_kernel = handle.read().strip()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "transparent_hugepage": thp_kernel,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_duration(seconds: float | None) -> str:
    """A time with a unit that keeps three significant figures: 85.2 us, 1.23 ms, 301 ms."""
    if seconds is None:
        return "-"
    for scale, unit in ((1e-3, "us"), (1.0, "ms")):
        if seconds < scale:
            return f"{seconds / scale * 1e3:.3g} {unit}"
    return f"{seconds:.3g} s"


def _ratio(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None or baseline == 0:
        return "-"
    return f"{value / baseline:.2f}x"


def _bandwidth(nbytes: int, seconds: float | None) -> str:
    if seconds is None or seconds == 0:
        return "-"
    return f"{nbytes / seconds / 1e9:.1f}"


def _memory(nbytes: int | None, logits_bytes: int) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**20:.0f} MiB ({nbytes / logits_bytes:.2f}x)"


def format_table(result: ShapeResult) -> str:
    """A plain-text table for one shape; ratios are to eager cross-entropy in the same run."""
    baseline = next((m for m in result.measurements if m.variant == "ce"), None)
    base_fwd = baseline.forward_median if baseline else None
    base_train = baseline.train_median if baseline else None
    header = (
        "variant",
        "fwd",
        "fwd vs ce",
        "fwd+bwd",
        "fwd+bwd vs ce",
        "GB/s fwd",
        "GB/s fwd+bwd",
        "peak extra memory",
        "compile s",
    )
    rows = [header]
    for m in result.measurements:
        if m.error is not None:
            rows.append((m.variant, f"failed: {m.error}", "", "", "", "", "", "", ""))
            continue
        rows.append(
            (
                m.variant,
                format_duration(m.forward_median),
                _ratio(m.forward_median, base_fwd),
                format_duration(m.train_median),
                _ratio(m.train_median, base_train),
                _bandwidth(result.logits_bytes, m.forward_median),
                # forward+backward must at least read the logits and write their gradient
                _bandwidth(2 * result.logits_bytes, m.train_median),
                _memory(m.peak_extra_bytes, result.logits_bytes),
                "-" if m.compile_s is None else f"{m.compile_s:.1f}",
            )
        )
    widths = [max(len(str(row[i])) for row in rows if len(row) > i) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        if row[1].startswith("failed"):
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]}")
        else:
            cells = [f"{row[0]:<{widths[0]}}"] + [
                f"{cell:>{widths[i + 1]}}" for i, cell in enumerate(row[1:])
            ]
            lines.append("  ".join(cells))
        if index == 0:
            lines.append("-" * len(lines[0]))
    shape = "x".join(str(s) for s in result.shape)
    size = result.logits_bytes / 2**20
    title = f"logits {shape} {result.dtype} on {result.device} ({size:.0f} MiB)"
    return "\n".join([title, *lines])


def to_json(
    results: Sequence[ShapeResult], info: dict[str, Any], settings: dict[str, Any]
) -> dict[str, Any]:
    """Everything measured, raw timings included."""
    return {
        "machine": info,
        "settings": settings,
        "results": [
            {
                **{k: v for k, v in asdict(result).items() if k != "measurements"},
                "measurements": [
                    {
                        **asdict(m),
                        "forward_median_s": m.forward_median,
                        "train_median_s": m.train_median,
                    }
                    for m in result.measurements
                ],
            }
            for result in results
        ],
    }


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a clear error without the plot extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the optional extra
        raise RuntimeError(
            "--plot needs matplotlib: pip install 'label-relaxation[plot]'"
        ) from error
    return plt


def plot(results: Sequence[ShapeResult], path: str) -> None:
    """Bar chart of forward+backward time relative to eager cross-entropy, one group per shape."""
    plt = _pyplot()
    names = [m.variant for m in results[0].measurements]
    width = 0.8 / max(len(results), 1)
    figure, axis = plt.subplots(figsize=(max(6, len(names) * 0.9), 4))
    for index, result in enumerate(results):
        baseline = next((m.train_median for m in result.measurements if m.variant == "ce"), None)
        values = [
            (m.train_median / baseline) if m.train_median and baseline else math.nan
            for m in result.measurements
        ]
        positions = [i + (index - (len(results) - 1) / 2) * width for i in range(len(names))]
        label = "x".join(str(s) for s in result.shape) + f" {result.dtype}"
        axis.bar(positions, values, width=width, label=label)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axis.set_ylabel("forward+backward time / eager cross-entropy")
    axis.set_title(f"label-relaxation benchmark (torch {torch.__version__})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def median_of(result: ShapeResult, variant: str, kind: str) -> float | None:
    """Median ``kind`` ("forward" or "train") time of ``variant`` at one shape, if measured."""
    for m in result.measurements:
        if m.variant == variant and m.error is None:
            return m.forward_median if kind == "forward" else m.train_median
    return None


def sweep_ratios(result: ShapeResult) -> dict[str, float | None]:
    """The sweep's figures at one shape, as ratios of median times from the same run.

    Each variant against eager cross-entropy, forward+backward and forward (`` fwd``), and
    compiled label relaxation against compiled cross-entropy.
    """
    ratios: dict[str, float | None] = {}
    for kind, suffix in (("train", ""), ("forward", " fwd")):
        base = median_of(result, "ce", kind)
        for m in result.measurements:
            value = median_of(result, m.variant, kind)
            if m.variant != "ce":
                ratios[m.variant + suffix] = value / base if value and base else None
        compiled_ce = median_of(result, "ce-compiled", kind)
        compiled_lr = median_of(result, "lr-compiled", kind)
        ratios["lr-compiled/ce-compiled" + suffix] = (
            compiled_lr / compiled_ce if compiled_lr and compiled_ce else None
        )
    return ratios


def format_sweep_table(results: Sequence[ShapeResult]) -> str:
    """One row per shape: eager cross-entropy's times, then every ratio of ``sweep_ratios``."""
    columns = list(sweep_ratios(results[0]).keys()) if results else []
    header = ["shape", "logits", "ce fwd+bwd", "ce fwd", *columns]
    rows = [header]
    for result in results:
        ratios = sweep_ratios(result)
        rows.append(
            [
                "x".join(str(size) for size in result.shape),
                f"{math.prod(result.shape):.3g}",
                format_duration(median_of(result, "ce", "train")),
                format_duration(median_of(result, "ce", "forward")),
                *("-" if ratios.get(c) is None else f"{ratios[c]:.2f}x" for c in columns),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot_sweep(results: Sequence[ShapeResult], path: str) -> None:
    """Each variant's time over eager cross-entropy's against the number of logits (log axis)."""
    plt = _pyplot()
    ordered = sorted(results, key=lambda result: math.prod(result.shape))
    ratios = [sweep_ratios(result) for result in ordered]
    sizes = [math.prod(result.shape) for result in ordered]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, suffix, title in ((axes[0], "", "forward+backward"), (axes[1], " fwd", "forward")):
        names = [n for n in ratios[0] if n.endswith(suffix) and (suffix or " fwd" not in n)]
        for name in names:
            values = [r[name] if r[name] is not None else math.nan for r in ratios]
            against_compiled = "/" in name
            label = name.removesuffix(suffix)
            axis.plot(
                sizes,
                values,
                marker="o",
                linestyle="--" if against_compiled else "-",
                label=label if against_compiled else f"{label} / ce",
            )
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_xlabel("logits per call (N x C)")
        axis.set_title(title)
    axes[0].set_ylabel("time ratio, medians of the same run")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"label-relaxation bench --sweep (torch {torch.__version__})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
