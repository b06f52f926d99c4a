"""What fresh CPU memory costs here, and why ``label-relaxation bench`` precedes timed calls.

Run from the repository root: ``THP_MEM_ALLOC_ENABLE=1 uv run python bench/fresh_memory.py``.

On virtual machines whose balloon device reports free pages to the host (virtio-balloon
``free page reporting``), memory that stays free for about two seconds is handed back to the
host, and the first write to it afterwards is several times slower than to memory freed a
moment ago. A training loop reuses its memory within milliseconds; a benchmark that
interleaves slow variants does not. Prints medians of ``--rounds`` rounds (default 5) of:

1. writing 1 GiB of freshly allocated memory after an idle pause of 0 to 5 s;
2. three fresh 1 GiB writes (what eager cross-entropy allocates in forward+backward) after a
   3 s pause, when 0, 1 or 2 times that much memory was written and freed just before;
3. eager ``F.cross_entropy`` forward+backward at 8192x32000 back to back, after a 3 s pause,
   and after a 3 s pause and one untimed call (what the benchmark does before every timed call).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

GIB = 1 << 30


def write_fresh(nbytes: int) -> torch.Tensor:
    """Allocate ``nbytes`` and write every page."""
    return torch.empty(nbytes, dtype=torch.uint8).fill_(1)


def elapsed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def median_ms(times: list[float]) -> str:
    return f"{statistics.median(times):7.0f} ms (min {min(times):.0f}, max {max(times):.0f})"


def idle_pauses(rounds: int) -> None:
    print("1. first write of 1 GiB after an idle pause")
    for pause in (0.0, 1.0, 2.0, 3.0, 5.0):
        times = []
        for _ in range(rounds):
            time.sleep(pause)
            times.append(elapsed_ms(lambda: write_fresh(GIB)))
        print(f"   pause {pause:.0f} s: {median_ms(times)}")


def rewarming(rounds: int) -> None:
    print("2. three fresh 1 GiB writes after a 3 s pause, rewarming first")
    for factor in (0, 1, 2):
        times = []
        for _ in range(rounds):
            time.sleep(3.0)
            if factor:
                write_fresh(factor * 3 * GIB)
            times.append(elapsed_ms(lambda: [write_fresh(GIB) for _ in range(3)]))
        print(f"   rewarm {factor} x 3 GiB: {median_ms(times)}")


def cross_entropy(rounds: int) -> None:
    print("3. eager F.cross_entropy forward+backward, 8192x32000 float32")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8192, 32000, generator=generator)
    target = torch.randint(0, 32000, (8192,), generator=generator)

    def train() -> None:
        leaf = logits.detach().requires_grad_()
        F.cross_entropy(leaf.clone(), target).backward()  # type: ignore[no-untyped-call]

    train()
    cases: dict[str, Callable[[], None]] = {
        "back to back": lambda: None,
        "after a 3 s pause": lambda: time.sleep(3.0),
        "after a 3 s pause and one untimed call": lambda: (time.sleep(3.0), train()),
    }
    for name, before in cases.items():
        times = []
        for _ in range(rounds):
            before()
            times.append(elapsed_ms(train))
        print(f"   {name}: {median_ms(times)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    idle_pauses(args.rounds)
    rewarming(args.rounds)
    cross_entropy(args.rounds)


if __name__ == "__main__":
    main()
