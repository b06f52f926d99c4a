"""Work run on every rank by tests/test_distributed.py (gloo, CPU processes).

Every rank builds the same full tensors from the same seed, so each can compare its share of a
distributed result with the single-process result on the full tensors. Each case writes what it
measured to ``out_dir/<case>-<rank>.pt``; the test process checks it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from label_relaxation import label_relaxation_loss
from label_relaxation.distributed import (
    global_mean_denominator,
    vocab_parallel_label_relaxation_loss,
)

CLASSES = 37  # not a multiple of 2 or 4: uneven slices


def init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def full_problem(
    seed: int = 0, shape: tuple[int, ...] = (3, 5)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, targets (some ignored), class weights and per-position alpha, the same everywhere."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, CLASSES, generator=generator) * 3
    target = torch.randint(0, CLASSES, shape, generator=generator)
    target.view(-1)[::4] = -100
    # A few rows far inside the credal set: their gradient is exactly zero.
    logits.view(-1, CLASSES)[1::5, 0] = 40.0
    target.view(-1)[1::5] = 0
    weight = torch.rand(CLASSES, generator=generator) + 0.5
    alpha = torch.rand(shape, generator=generator) * 0.3 + 0.01
    return logits, target, weight, alpha


def local_slice(full: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """This rank's classes as ``torch.chunk`` splits them (DTensor's Shard), and its start."""
    pieces = torch.chunk(full, world, dim=-1)
    start = sum(piece.shape[-1] for piece in pieces[:rank])
    return pieces[rank], start


KWARGS: dict[str, dict[str, Any]] = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "weight+alpha": {"weight": "weight", "alpha": "alpha"},
    "weight+alpha,none": {"weight": "weight", "alpha": "alpha", "reduction": "none"},
}


def _resolve(kwargs: dict[str, Any], weight: torch.Tensor, alpha: torch.Tensor) -> dict[str, Any]:
    resolved = dict(kwargs)
    if "weight" in kwargs:
        resolved["weight"] = weight
    resolved["alpha"] = alpha if "alpha" in kwargs else 0.1
    return resolved


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _incoming_gradient(kwargs: dict[str, Any], scalar: float) -> torch.Tensor:
    """Per-position incoming gradients for ``reduction="none"``, the same on every rank."""
    if kwargs.get("reduction") != "none":
        return torch.tensor(scalar)
    return torch.rand(3, 5, generator=torch.Generator().manual_seed(11)) + 0.5


def single_process(
    logits: torch.Tensor, target: torch.Tensor, kwargs: dict[str, Any], grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.clone().requires_grad_()
    loss = label_relaxation_loss(leaf, target, **kwargs)
    loss.backward(grad_out)
    assert leaf.grad is not None
    return loss.detach(), leaf.grad


def case_plain(rank: int, world: int) -> dict[str, Any]:
    """The process-group API against one process, every reduction and argument."""
    logits, target, weight, alpha = full_problem()
    results = {}
    for name, kwargs in KWARGS.items():
        resolved = _resolve(kwargs, weight, alpha)
        grad_out = _incoming_gradient(resolved, 1.3)
        expected_loss, expected_grad = single_process(logits, target, resolved, grad_out)
        local, start = local_slice(logits, rank, world)
        local = local.clone().requires_grad_()
        loss = vocab_parallel_label_relaxation_loss(
            local, target, vocab_start=start, num_classes=CLASSES, **resolved
        )
        loss.backward(grad_out)
        expected_local, _ = local_slice(expected_grad, rank, world)
        assert local.grad is not None
        results[name] = (
            _relative_error(loss.detach(), expected_loss),
            _relative_error(local.grad, expected_local),
        )
    return results


def case_dtensor(rank: int, world: int) -> dict[str, Any]:
    """DTensor logits sharded on the classes, inside and outside loss_parallel, with comm counts."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh("cpu", (world,))
    logits, target, weight, alpha = full_problem()
    results: dict[str, Any] = {}
    for name, kwargs in KWARGS.items():
        for inside_loss_parallel in (False, True):
            resolved = _resolve(kwargs, weight, alpha)
            grad_out = _incoming_gradient(resolved, 0.7)
            expected_loss, expected_grad = single_process(logits, target, resolved, grad_out)
            sharded = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_()
            forward_comms, backward_comms = CommDebugMode(), CommDebugMode()
            context = loss_parallel() if inside_loss_parallel else contextlib.nullcontext()
            with context:
                with forward_comms:
                    loss = label_relaxation_loss(sharded, target, **resolved)
                with backward_comms:
                    loss.backward(distribute_like(grad_out, loss))
            assert sharded.grad is not None
            results[(name, inside_loss_parallel)] = {
                "loss_error": _relative_error(loss.full_tensor(), expected_loss),
                "grad_error": _relative_error(sharded.grad.full_tensor(), expected_grad),
                "grad_placements": _names(sharded.grad.placements),
                "loss_placements": _names(loss.placements),
                "forward_comms": _comm_counts(forward_comms),
                "backward_comms": _comm_counts(backward_comms),
            }
    return results


def _names(placements: Any) -> list[str]:
    """``Shard(2)``, ``Replicate()``: placements by class name and sharded dimension."""
    return [f"{type(p).__name__}({getattr(p, 'dim', '')})" for p in placements]


def distribute_like(value: torch.Tensor, like: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, like.device_mesh, like.placements, run_check=False)


def _comm_counts(mode: Any) -> dict[str, int]:
    return {str(op): count for op, count in mode.get_comm_counts().items() if count}


def case_bad_target(rank: int, world: int) -> dict[str, Any]:
    """A bad target raises the same error on every rank, and no rank is left in a collective."""
    logits, target, _, _ = full_problem()
    target[1, 2] = CLASSES + 5
    local, start = local_slice(logits, rank, world)
    try:
        vocab_parallel_label_relaxation_loss(local, target, vocab_start=start, num_classes=CLASSES)
        message = None
    except IndexError as error:
        message = str(error)
    # Every rank reaches this collective: none is waiting inside the loss.
    flag = torch.tensor([1.0])
    dist.all_reduce(flag)
    return {"message": message, "all_reached": float(flag)}


def case_compiled_dtensor(rank: int, world: int) -> dict[str, Any]:
    """DTensor forward+backward under torch.compile (aot_eager): same values, one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    logits, target, _, _ = full_problem()
    expected_loss, expected_grad = single_process(logits, target, {}, torch.tensor(1.0))
    counter = CompileCounterWithBackend("aot_eager")

    def step(sharded: Any) -> Any:
        return label_relaxation_loss(sharded, target, 0.1)

    compiled = torch.compile(step, backend=counter)
    sharded = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_()
    loss = compiled(sharded)
    loss.backward()
    assert sharded.grad is not None
    return {
        "loss_error": _relative_error(loss.full_tensor(), expected_loss),
        "grad_error": _relative_error(sharded.grad.full_tensor(), expected_grad),
        "frames": counter.frame_count,
    }


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and targets of the whole batch: 12 positions, ignored ones unevenly placed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 8, generator=generator)
    y = torch.randint(0, 5, (12,), generator=generator)
    y[[0, 1, 2, 3, 4, 9]] = -100  # the first half of the batch counts 1 position, the second 5
    return x, y


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))


STEPS = 3


def single_process_training() -> list[torch.Tensor]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        x, y = _data(step)
        optimizer.zero_grad()
        label_relaxation_loss(model(x), y, 0.1).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _train_data_parallel(
    wrap: Callable[[torch.nn.Module], torch.nn.Module],
    rank: int,
    world: int,
    global_mean: bool = True,
) -> list[torch.Tensor]:
    """Train on this rank's share of every batch; ``global_mean=False``: each rank's own mean."""
    model = wrap(_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        x, y = _data(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        optimizer.zero_grad()
        if global_mean:
            total = global_mean_denominator(y)
            loss = label_relaxation_loss(model(x), y, 0.1, reduction="sum") * world / total
        else:
            loss = label_relaxation_loss(model(x), y, 0.1)
        loss.backward()
        optimizer.step()
    return [_full(p).detach().clone() for p in model.parameters()]


def _full(parameter: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(parameter, "full_tensor", None)
    return full_tensor() if full_tensor is not None else parameter


def case_data_parallel(rank: int, world: int) -> dict[str, Any]:
    """DDP and FSDP2 with the global mean: the parameters of one process on the whole batch."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    expected = single_process_training()
    results: dict[str, Any] = {}
    ddp = _train_data_parallel(DistributedDataParallel, rank, world)
    results["ddp"] = max(_relative_error(a, b) for a, b in zip(ddp, expected, strict=True))

    def shard(model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.tensor import init_device_mesh

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        return model

    fsdp = _train_data_parallel(shard, rank, world)
    results["fsdp2"] = max(_relative_error(a, b) for a, b in zip(fsdp, expected, strict=True))
    # Each rank's own "mean" averaged by DDP is not the mean of the whole batch here.
    naive = _train_data_parallel(DistributedDataParallel, rank, world, global_mean=False)
    results["naive_ddp"] = max(_relative_error(a, b) for a, b in zip(naive, expected, strict=True))
    return results


def case_linear(rank: int, world: int) -> dict[str, Any]:
    """The fused linear loss with the weight split on the classes: plain group and DTensor."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from label_relaxation import linear_label_relaxation_loss
    from label_relaxation.distributed import vocab_parallel_linear_label_relaxation_loss

    generator = torch.Generator().manual_seed(3)
    hidden, rows = 6, 15
    x = torch.randn(3, 5, hidden, generator=generator)
    w = torch.randn(CLASSES, hidden, generator=generator)
    b = torch.randn(CLASSES, generator=generator)
    target = torch.randint(0, CLASSES, (3, 5), generator=generator)
    target[0, 0] = -100
    alpha = torch.rand(3, 5, generator=generator) * 0.3 + 0.01
    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, Any] = {}
    for reduction in ("mean", "none"):
        grad_out = _incoming_gradient({"reduction": reduction}, 1.0)
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        expected = linear_label_relaxation_loss(
            leaves[0], leaves[1], target, alpha, linear_bias=leaves[2], reduction=reduction
        )
        expected.backward(grad_out)
        expected_grads = [leaf.grad for leaf in leaves]
        w_local, start = local_slice(w.t(), rank, world)
        b_local, _ = local_slice(b, rank, world)
        local = [t.clone().requires_grad_() for t in (x, w_local.t().contiguous(), b_local)]
        comms = CommDebugMode()
        with comms:
            loss = vocab_parallel_linear_label_relaxation_loss(
                local[0],
                local[1],
                target,
                alpha,
                vocab_start=start,
                num_classes=CLASSES,
                local_bias=local[2],
                reduction=reduction,
                chunk_size=4,
            )
            loss.backward(grad_out)
        blocks = -(-rows // 4)
        results[("plain", reduction)] = {
            "loss_error": _relative_error(loss.detach(), expected.detach()),
            "input_error": _relative_error(local[0].grad, expected_grads[0]),
            "weight_error": _relative_error(
                local[1].grad, local_slice(expected_grads[1].t(), rank, world)[0].t()
            ),
            "bias_error": _relative_error(
                local[2].grad, local_slice(expected_grads[2], rank, world)[0]
            ),
            "collectives": sum(comms.get_comm_counts().values()),
            # Reduced: 2 per block forward, 1 for the input's gradient. "none" computes the
            # statistics again in the backward pass: 2 more per block.
            "expected_collectives": (2 * blocks + 1) if reduction == "mean" else (4 * blocks + 1),
        }
        sharded_w = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
        sharded_b = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
        x_leaf = x.clone().requires_grad_()
        loss = linear_label_relaxation_loss(
            x_leaf, sharded_w, target, alpha, linear_bias=sharded_b, reduction=reduction
        )
        loss.backward(distribute_like(grad_out, loss))
        results[("dtensor", reduction)] = {
            "loss_error": _relative_error(loss.full_tensor(), expected.detach()),
            "input_error": _relative_error(x_leaf.grad, expected_grads[0]),
            "weight_error": _relative_error(sharded_w.grad.full_tensor(), expected_grads[1]),
            "bias_error": _relative_error(sharded_b.grad.full_tensor(), expected_grads[2]),
            "weight_placements": _names(sharded_w.grad.placements),
        }
    return results


CASES: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "linear": case_linear,
    "plain": case_plain,
    "dtensor": case_dtensor,
    "bad_target": case_bad_target,
    "compiled_dtensor": case_compiled_dtensor,
    "data_parallel": case_data_parallel,
}


def worker(rank: int, world: int, init_file: str, out_dir: str, cases: list[str]) -> None:
    """Entry point of each spawned rank: run ``cases`` and save what they measured."""
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    try:
        init(rank, world, init_file)
    except Exception:
        # Setting up the process group (gloo connecting every pair of ranks over TCP) is the
        # test machine's part, not the code under test: the test process may try once more.
        (Path(out_dir) / f"init-failed-{rank}").touch()
        raise
    for name in cases:
        torch.save(CASES[name](rank, world), Path(out_dir) / f"{name}-{rank}.pt")
    # Every rank is done with every collective before any rank tears its group down.
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: with gloo's threads still winding down it occasionally
    # ended a finished rank with std::terminate (SIGABRT) after its results were saved.
    os._exit(0)
