"""Label relaxation on ``torch.distributed``: class-sharded logits and data-parallel means.

* :func:`vocab_parallel_label_relaxation_loss` takes each rank's slice of the classes (the
  output of a vocabulary-parallel output layer, Megatron style) and a process group.
* :func:`label_relaxation_loss` accepts a ``DTensor`` sharded on the class dimension (as a
  ``ColwiseParallel(use_local_output=False)`` output layer gives) and dispatches here.
* :func:`global_mean_denominator` gives data-parallel training the ``"mean"`` of one process on
  the concatenated batch.

See ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from label_relaxation._impl import validation as check
from label_relaxation._impl.fused import compute_dtype
from label_relaxation._impl.validation import Reduction
from label_relaxation._impl.vocab_parallel import vocab_parallel_rows
from label_relaxation.functional import prepare_targets


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """``group``, or the default (world) group."""
    if group is not None:
        return group
    world = dist.group.WORLD
    if world is None:
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    return world


def _check_slice(local: int, vocab_start: int, num_classes: int) -> None:
    """Check that ``local`` classes from ``vocab_start`` lie within ``num_classes``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    if vocab_start + local > num_classes:
        raise ValueError(
            f"the local slice holds classes [{vocab_start}, {vocab_start + local}), beyond "
            f"num_classes = {num_classes}"
        )


def vocab_parallel_label_relaxation_loss(
    local_logits: Tensor,
    target: Tensor,
    alpha: float | Tensor = 0.1,
    *,
    vocab_start: int,
    num_classes: int,
    group: dist.ProcessGroup | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    validate: bool = True,
) -> Tensor:
    """Label relaxation loss of logits whose classes are split across the ranks of ``group``.

    Rank ``i`` holds the logits of every position for the classes ``[vocab_start, vocab_start +
    local_logits.shape[-1])``; together the slices cover ``num_classes`` classes. The result
    equals :func:`~label_relaxation.label_relaxation_loss` of the concatenated logits, on every
    rank. The forward pass makes two all-reduces of ``N`` and ``2·N`` numbers (``N``
    positions), the backward pass none: each rank's gradient is that of its own slice.

    Args:
        local_logits: This rank's slice ``(..., C_local)`` of the logits, classes last.
        target: Global class indices of shape ``local_logits.shape[:-1]``, the same on every
            rank (replicated).
        alpha: Relaxation in (0, 1): a float, or a tensor broadcastable to the positions, the
            same on every rank.
        vocab_start: The first class of this rank's slice.
        num_classes: The number of classes over all ranks.
        group: The process group over which the classes are split (default: the world).
        weight: Optional class weights ``(num_classes,)``, all classes, the same on every rank.
        ignore_index: Targets equal to this value contribute no loss and no gradient.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``, as in ``label_relaxation_loss``.
        validate: Check target and alpha values. Every rank checks the same replicated values
            before the first collective, so a bad value raises on every rank and none is left
            waiting in a collective.

    Returns:
        The loss, the same on every rank: 0-d, or ``(...)`` with ``reduction="none"``.

    Raises:
        TypeError: An argument has an unsupported type or dtype.
        ValueError: A shape does not match, the slice lies beyond ``num_classes``, ``alpha``
            lies outside (0, 1) or ``reduction`` is unknown.
        IndexError: A class index lies outside ``[0, num_classes)`` and is not ``ignore_index``.

    Shape:
        - local_logits: ``(..., C_local)``.
        - target: ``(...)``.
        - output: ``()``, or ``(...)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> import torch.distributed as dist
        >>> from label_relaxation.distributed import vocab_parallel_label_relaxation_loss
        >>> def step(local_logits, target, rank, world):  # doctest: +SKIP
        ...     per_rank = 32000 // world
        ...     loss = vocab_parallel_label_relaxation_loss(
        ...         local_logits, target, 0.1, vocab_start=rank * per_rank, num_classes=32000
        ...     )
        ...     loss.backward()
    """
    check.check_logits(local_logits)
    check.check_reduction(reduction)
    check.check_weight(weight, num_classes)
    _check_slice(int(local_logits.shape[-1]), vocab_start, num_classes)
    batch_shape = local_logits.shape[:-1]
    if not isinstance(target, Tensor) or target.is_floating_point():
        raise TypeError("target must be a tensor of integer class indices")
    if tuple(target.shape) != tuple(batch_shape):
        raise ValueError(
            f"target must have shape local_logits.shape[:-1] = {tuple(batch_shape)}, got shape "
            f"{tuple(target.shape)}"
        )
    rows = prepare_targets(
        batch_shape,
        num_classes,
        compute_dtype(local_logits.dtype),
        target,
        alpha,
        weight,
        ignore_index,
        reduction,
        validate,
    )
    local_rows = local_logits.reshape(-1, local_logits.shape[-1])
    loss_rows = vocab_parallel_rows(
        local_rows, rows.target, vocab_start, rows.alpha, rows.row_weight, _group(group)
    )
    return loss_rows.reshape(batch_shape) if reduction == "none" else loss_rows.sum()


def global_mean_denominator(
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """What ``reduction="mean"`` divides by for the batches of all ranks together.

    Under data parallelism (DDP, FSDP) each rank's ``"mean"`` divides by its own count of
    counted positions (the summed class weights of its non-ignored targets), and DDP and FSDP
    then average the gradients over the ranks: when ranks count different numbers of positions
    that is not the mean over the whole batch. One all-reduce of this count gives the global
    denominator::

        total = global_mean_denominator(target, ignore_index=-100)
        loss = label_relaxation_loss(logits, target, reduction="sum") * world_size / total

    (``world_size`` undoes the gradient averaging of DDP and FSDP.)

    Args:
        target: This rank's class indices.
        weight: Optional class weights ``(C,)``, as given to the loss.
        ignore_index: The ignored target value, as given to the loss.
        group: The data-parallel process group (default: the world).

    Returns:
        A 0-d float tensor, the same on every rank: 1 where no rank counts any position
        (then the loss is 0, as for an all-ignored batch).
    """
    counted = target != ignore_index
    if weight is None:
        local = counted.sum().to(torch.float64)
    else:
        safe = torch.where(counted, target, 0)
        local = torch.where(counted, weight.to(torch.float64)[safe], 0.0).sum()
    total = funcol.all_reduce(local, "sum", _group(group))
    return torch.where(total != 0, total, torch.ones_like(total))


def _dtensor_argument(value: Any, name: str) -> Any:
    """A replicated DTensor argument as a plain tensor; other values unchanged."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(value, DTensor):
        return value
    if not all(isinstance(placement, Replicate) for placement in value.placements):
        raise ValueError(
            f"{name} must be replicated when the logits are a DTensor, got placements "
            f"{value.placements}"
        )
    return value.to_local()


def dtensor_label_relaxation_loss(
    logits: Any,
    target: Tensor,
    alpha: float | Tensor,
    *,
    weight: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    validate: bool,
) -> Any:
    """:func:`label_relaxation_loss` of a DTensor sharded on the class dimension.

    The class dimension must be sharded on exactly one mesh dimension and every other mesh
    dimension replicated. Returns a DTensor, replicated, as ``loss_parallel`` does.
    """
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    assert isinstance(logits, DTensor)
    class_dim = logits.ndim - 1
    mesh, placements = logits.device_mesh, logits.placements
    mesh_dim = _class_sharded_mesh_dim(logits, class_dim, "logits")
    _, offset = compute_local_shape_and_global_offset(logits.shape, mesh, placements)
    loss = vocab_parallel_label_relaxation_loss(
        logits.to_local(),
        _dtensor_argument(target, "target"),
        _dtensor_argument(alpha, "alpha"),
        vocab_start=int(offset[class_dim]),
        num_classes=int(logits.shape[class_dim]),
        group=mesh.get_group(mesh_dim),
        weight=_dtensor_argument(weight, "weight"),
        ignore_index=ignore_index,
        reduction=reduction,
        validate=validate,
    )
    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)


def vocab_parallel_linear_label_relaxation_loss(
    input: Tensor,
    local_weight: Tensor,
    target: Tensor,
    alpha: float | Tensor = 0.1,
    *,
    vocab_start: int,
    num_classes: int,
    group: dist.ProcessGroup | None = None,
    local_bias: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
    validate: bool = True,
    return_training_fraction: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The fused output layer + loss with the layer's weight split along the classes.

    Rank ``i`` holds the rows ``[vocab_start, vocab_start + V_local)`` of the ``(num_classes,
    H)`` weight (a vocabulary-parallel output layer); ``input`` is replicated. The result equals
    :func:`~label_relaxation.linear_label_relaxation_loss` with the full weight, on every rank.
    Per block of rows the forward pass makes the two all-reduces of
    :func:`vocab_parallel_label_relaxation_loss`; the gradient of ``input``, to which every
    rank's classes contribute, is all-reduced once (``N·H`` numbers), and every rank receives
    it whole, as the gradient of a replicated input. The weight's and bias's gradients stay
    local.

    Args:
        input: Features ``(..., H)``, the same on every rank.
        local_weight: This rank's rows ``(V_local, H)`` of the output layer's weight.
        target: Global class indices of shape ``input.shape[:-1]``, the same on every rank.
        alpha: Relaxation in (0, 1): a float, or a per-position tensor, the same on every rank.
        vocab_start: The first class of this rank's rows.
        num_classes: The number of classes over all ranks.
        group: The process group over which the classes are split (default: the world).
        local_bias: This rank's slice ``(V_local,)`` of the bias.
        weight: Optional class weights ``(num_classes,)``, the same on every rank.
        ignore_index: Targets equal to this value contribute no loss and no gradient.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        chunk_size: Rows per block (see ``linear_label_relaxation_loss``).
        validate: Check target and alpha values, on every rank before any collective.
        return_training_fraction: Also return the fraction of counted positions that train.

    Returns:
        The loss, the same on every rank (and the fraction with ``return_training_fraction``).

    Raises:
        TypeError: An argument has an unsupported type or dtype.
        ValueError: A shape does not match, the slice lies beyond ``num_classes``, or an
            argument value is invalid.
        IndexError: A class index lies outside ``[0, num_classes)`` and is not ``ignore_index``.
        NotImplementedError: Under ``torch.func`` transforms or with a gradient for ``alpha``
            or the class weights.

    Shape:
        - input: ``(..., H)``; local_weight: ``(V_local, H)``.
        - target: ``(...)``; output: ``()``, or ``(...)`` with ``reduction="none"``.

    Example:
        >>> from label_relaxation.distributed import (
        ...     vocab_parallel_linear_label_relaxation_loss,
        ... )
        >>> def step(hidden, local_head_weight, target, rank, world):  # doctest: +SKIP
        ...     per_rank = 32000 // world
        ...     loss = vocab_parallel_linear_label_relaxation_loss(
        ...         hidden, local_head_weight, target, 0.1,
        ...         vocab_start=rank * per_rank, num_classes=32000,
        ...     )
        ...     loss.backward()
    """
    from label_relaxation.linear import _check_arguments, _needs_reference, fused_linear_loss

    _check_arguments(input, local_weight, local_bias, target, chunk_size)
    check.check_reduction(reduction)
    check.check_weight(weight, num_classes)
    _check_slice(int(local_weight.shape[0]), vocab_start, num_classes)
    if _needs_reference(input, alpha, weight):
        raise NotImplementedError(
            "the vocabulary-parallel fused loss runs without torch.func transforms and without "
            "a gradient for alpha or the class weights; there, compute the local logits "
            "F.linear(input, local_weight) and use vocab_parallel_label_relaxation_loss"
        )
    return fused_linear_loss(
        input,
        local_weight,
        local_bias,
        target,
        alpha,
        num_classes=num_classes,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=chunk_size,
        validate=validate,
        return_training_fraction=return_training_fraction,
        vocab_start=vocab_start,
        group_name=_group(group).group_name,
    )


def _class_sharded_mesh_dim(tensor: Any, dim: int, what: str) -> int:
    """The one mesh dimension that shards ``tensor``'s dimension ``dim``; others replicated."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tensor.placements
    sharded = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == dim]
    others_replicated = all(
        isinstance(p, Replicate) for i, p in enumerate(placements) if i not in sharded
    )
    if len(sharded) != 1 or not others_replicated:
        raise ValueError(
            f"{what} must be a DTensor sharded on dimension {dim} (the classes) on one mesh "
            f"dimension and replicated on the others, got placements {placements}"
        )
    return sharded[0]


def dtensor_linear_label_relaxation_loss(
    input: Any,
    linear_weight: Any,
    target: Any,
    alpha: Any,
    *,
    linear_bias: Any,
    weight: Any,
    ignore_index: int,
    reduction: Reduction,
    chunk_size: int | None,
    validate: bool,
    return_training_fraction: bool,
) -> Any:
    """``linear_label_relaxation_loss`` with a weight DTensor sharded on the classes (Shard(0)).

    ``input`` is a plain tensor or a replicated DTensor; the loss is a replicated DTensor.
    """
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh_dim = _class_sharded_mesh_dim(linear_weight, 0, "linear_weight")
    mesh = linear_weight.device_mesh
    _, offset = compute_local_shape_and_global_offset(
        linear_weight.shape, mesh, linear_weight.placements
    )
    local_bias = linear_bias
    if isinstance(linear_bias, DTensor):
        _class_sharded_mesh_dim(linear_bias, 0, "linear_bias")
        local_bias = linear_bias.to_local()
    result = vocab_parallel_linear_label_relaxation_loss(
        _dtensor_argument(input, "input"),
        linear_weight.to_local(),
        _dtensor_argument(target, "target"),
        _dtensor_argument(alpha, "alpha"),
        vocab_start=int(offset[0]),
        num_classes=int(linear_weight.shape[0]),
        group=mesh.get_group(mesh_dim),
        local_bias=local_bias,
        weight=_dtensor_argument(weight, "weight"),
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=chunk_size,
        validate=validate,
        return_training_fraction=return_training_fraction,
    )
    replicated = [Replicate()] * mesh.ndim
    if isinstance(result, tuple):
        loss, fraction = result
        return DTensor.from_local(loss, mesh, replicated, run_check=False), fraction
    return DTensor.from_local(result, mesh, replicated, run_check=False)
