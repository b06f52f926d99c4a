"""Why the kernels use exp2: ATen's and Inductor's exp2 against their exp, in one run.

Run from the repository root: ``THP_MEM_ALLOC_ENABLE=1 uv run python bench/exp2_vs_exp.py``.
Prints medians of interleaved rounds for

* eager: one pass of ``torch.exp`` / ``torch.exp2`` over 1 GiB of float32 logits shifted by
  their row maximum, written in 8 MiB chunks into a reused buffer, as the fused kernel does;
* compiled: forward+backward of the pure formulation (``implementation="reference"`` under
  ``torch.compile``) with exp and with exp2 (the shipped one).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from unittest import mock

import torch

from label_relaxation import label_relaxation_loss
from label_relaxation._impl import reference as _reference


def timed_ms(fn: Callable[[], object], results: list[float]) -> None:
    start = time.perf_counter()
    fn()
    results.append((time.perf_counter() - start) * 1e3)


def eager_passes(rounds: int) -> None:
    # Shifted by the row maximum, as the kernels see them: every exponent <= 0.
    logits = torch.randn(8192, 32000) * 3
    logits -= logits.amax(-1, keepdim=True)
    rows = (1 << 21) // logits.shape[1]
    work = torch.empty(rows, logits.shape[1])

    def chunked(op: Callable[..., torch.Tensor]) -> None:
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start : start + rows]
            op(chunk, out=work[: chunk.shape[0]])

    times: dict[str, list[float]] = {"exp": [], "exp2": []}
    for _ in range(rounds):
        timed_ms(lambda: chunked(torch.exp), times["exp"])
        timed_ms(lambda: chunked(torch.exp2), times["exp2"])
    exp, exp2 = (statistics.median(times[k]) for k in ("exp", "exp2"))
    print(f"eager, 1 GiB in 8 MiB chunks: exp {exp:.0f} ms, exp2 {exp2:.0f} ms ({exp2 / exp:.2f}x)")


def compiled_reference(rounds: int) -> None:
    logits = torch.randn(4096, 32000) * 3
    target = torch.randint(0, 32000, (4096,))

    def make() -> Callable[[torch.Tensor], torch.Tensor]:
        def loss(z: torch.Tensor) -> torch.Tensor:
            return label_relaxation_loss(z, target, 0.1, implementation="reference")

        return torch.compile(loss, fullgraph=True, dynamic=False)

    def train(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        fn(logits.detach().clone().requires_grad_()).backward()  # type: ignore[no-untyped-call]

    # The same formulation with plain exp under the compiler, for comparison. Dynamo guards on
    # the patched function, so each call runs the graph compiled for its own variant.
    plain_exp = mock.patch.object(_reference, "_exp", lambda shifted: shifted.exp())
    with_exp2, with_exp = make(), make()
    train(with_exp2)
    with plain_exp:
        train(with_exp)
    times: dict[str, list[float]] = {"exp": [], "exp2": []}
    for _ in range(rounds):
        with plain_exp:
            timed_ms(lambda: train(with_exp), times["exp"])
        timed_ms(lambda: train(with_exp2), times["exp2"])
    exp, exp2 = (statistics.median(times[k]) for k in ("exp", "exp2"))
    print(
        f"compiled reference, fwd+bwd 4096x32000: exp {exp:.0f} ms, exp2 {exp2:.0f} ms "
        f"({exp2 / exp:.2f}x)"
    )


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds")
    eager_passes(rounds)
    compiled_reference(rounds)
