"""Fused linear losses of other projects against ours, timed in one run (a scratch environment).

cut-cross-entropy must not enter the project's environment; run this in a scratch one:

    uv venv -p 3.11 /tmp/cce
    VIRTUAL_ENV=/tmp/cce uv pip install torch==2.15.0 cut-cross-entropy
    VIRTUAL_ENV=/tmp/cce uv pip install -e .
    THP_MEM_ALLOC_ENABLE=1 /tmp/cce/bin/python bench/peer_linear.py

Variants at (tokens, H, V) = (4096, 1024, 32000), float32, every row outside the credal set:
cut-cross-entropy's ``impl="torch_compile"`` (its CPU implementation), PyTorch's chunked
``F.linear_cross_entropy`` and ``linear_label_relaxation_loss``. Medians of ``--repeat`` calls
back to back after an untimed one; extra memory as in ``label-relaxation bench --hidden``.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

from label_relaxation import linear_label_relaxation_loss
from label_relaxation.tools.linear_benchmark import (
    LinearTiming,
    _call,
    _peak_extra,
    _timed_call,
    make_problem,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="4096x1024x32000", help="TOKENSxHxV")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--chunk-sizes",
        default="",
        help="comma-separated chunk sizes for more runs of the fused loss, like 256,512",
    )
    args = parser.parse_args()
    tokens, hidden, vocab = (int(part) for part in args.shape.split("x"))
    variants = {
        "cut-cross-entropy torch_compile": lambda x, w, y: cce_linear_cross_entropy(
            x, w, y, impl="torch_compile"
        ),
        "torch-chunked": lambda x, w, y: F.linear_cross_entropy(
            x, w, y, options=torch.nn.LinearCrossEntropyOptions()
        ),
        "fused (label relaxation)": lambda x, w, y: linear_label_relaxation_loss(x, w, y, 0.1),
    }
    for size in (int(part) for part in args.chunk_sizes.split(",") if part.strip()):
        variants[f"fused, chunk_size={size}"] = lambda x, w, y, size=size: (
            linear_label_relaxation_loss(x, w, y, 0.1, chunk_size=size)
        )
    problem = make_problem(
        tokens, hidden, vocab, inside=0.0, dtype=torch.float32, device=torch.device("cpu")
    )
    timings = []
    for name, function in variants.items():
        timing = LinearTiming(name, 0.0)
        _call(function, problem)
        timing.peak_extra_bytes = _peak_extra(function, problem)
        timing.seconds = [_timed_call(function, problem) for _ in range(args.repeat)]
        timings.append(timing)
        print(f"{name}: {[round(s, 3) for s in timing.seconds]}", flush=True)
    fused = next(t.median for t in timings if t.mode == "fused (label relaxation)")
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"(tokens, H, V) = ({tokens}, {hidden}, {vocab}), float32, medians of {args.repeat}")
    print("| variant | median fwd+bwd | extra memory | time / fused |")
    print("|---|---:|---:|---:|")
    for timing in timings:
        extra = timing.peak_extra_bytes
        memory = "n/a" if extra is None else f"{extra / 2**20:.1f} MiB"
        print(
            f"| {timing.mode} | {timing.median * 1e3:.0f} ms | {memory} | "
            f"{timing.median / fused:.2f}x |"
        )


if __name__ == "__main__":
    main()
