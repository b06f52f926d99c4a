"""Loss over class-sharded logits on 2 CPU ranks (gloo): time per step and bytes communicated.

    THP_MEM_ALLOC_ENABLE=1 uv run python bench/distributed.py [--shape 4096x32000] [--repeat 5]

Each rank holds half the classes of ``(N, V)`` float32 logits as a ``DTensor`` (``Shard(-1)``).
Variants, forward+backward:

* ``lr-dtensor``: ``label_relaxation_loss`` on the sharded logits;
* ``ce-loss-parallel``: ``F.cross_entropy`` on them inside ``loss_parallel()``;
* ``lr-gather``: the logits gathered on every rank (``full_tensor()``), then the loss.

Bytes communicated: the payload of every collective a rank issues during one step (the input
tensor of each all-reduce or all-gather), counted with ``CommDebugMode``; a ring all-reduce of
``b`` bytes sends about ``2·b·(w-1)/w`` bytes per rank on the wire.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor.debug import CommDebugMode

from label_relaxation import label_relaxation_loss


class CollectiveBytes(CommDebugMode):
    """``CommDebugMode`` that also sums the bytes of the first tensor each collective gets."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    @property
    def calls(self) -> int:
        return sum(self.get_comm_counts().values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        before = self.calls
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.calls > before:
            self.bytes += _first_tensor_bytes(args)
        return out


def _first_tensor_bytes(args: tuple[Any, ...]) -> int:
    for value in args:
        for tensor in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(tensor, torch.Tensor):
                return tensor.numel() * tensor.element_size()
    return 0


def variants(mesh: Any) -> dict[str, Callable[[Any, torch.Tensor], Any]]:
    from torch.distributed.tensor.parallel import loss_parallel

    def lr_dtensor(logits: Any, target: torch.Tensor) -> Any:
        return label_relaxation_loss(logits, target, 0.1)

    def ce_loss_parallel(logits: Any, target: torch.Tensor) -> Any:
        with loss_parallel():
            return F.cross_entropy(logits, target)

    def lr_gather(logits: Any, target: torch.Tensor) -> Any:
        return label_relaxation_loss(logits.full_tensor(), target, 0.1)

    return {"lr-dtensor": lr_dtensor, "ce-loss-parallel": ce_loss_parallel, "lr-gather": lr_gather}


def _step(function: Callable[[Any, torch.Tensor], Any], logits: Any, target: torch.Tensor) -> None:
    from torch.distributed.tensor.parallel import loss_parallel

    logits.grad = None
    loss = function(logits, target)
    # loss_parallel's backward must run inside the context too.
    with loss_parallel():
        loss.backward()


def worker(rank: int, world: int, init_file: str, shape: tuple[int, int], repeat: int) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(0)
    rows, classes = shape
    full = torch.randn(rows, classes, generator=generator)
    target = torch.randint(0, classes, (rows,), generator=generator)
    logits = distribute_tensor(full, mesh, [Shard(-1)]).requires_grad_()
    del full
    results = {}
    for name, function in variants(mesh).items():
        _step(function, logits, target)  # untimed: first-touch allocations
        counter = CollectiveBytes()
        with counter:
            _step(function, logits, target)
        seconds = []
        for _ in range(repeat):
            dist.barrier()
            begin = time.perf_counter()
            _step(function, logits, target)
            seconds.append(time.perf_counter() - begin)
        results[name] = (statistics.median(seconds), counter.bytes, counter.calls)
    if rank == 0:
        print(
            f"torch {torch.__version__}; {world} ranks (gloo, CPU, {torch.get_num_threads()} "
            f"thread(s) each); logits {rows}x{classes} float32 split on the classes; "
            f"medians of {repeat} steps"
        )
        print("| variant | median fwd+bwd | collectives per step | payload per rank |")
        print("|---|---:|---:|---:|")
        for name, (median, nbytes, calls) in results.items():
            print(f"| {name} | {median * 1e3:.0f} ms | {calls} | {_size(nbytes)} |")
    dist.destroy_process_group()


def _size(nbytes: int) -> str:
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes / 2**10:.1f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x32000", help="ROWSxCLASSES of the full logits")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    shape = tuple(int(part) for part in args.shape.split("x"))
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(
            worker,
            args=(args.ranks, os.path.join(folder, "init"), shape, args.repeat),
            nprocs=args.ranks,
        )


if __name__ == "__main__":
    main()
