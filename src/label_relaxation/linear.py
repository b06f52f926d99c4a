"""The output layer fused with the loss: ``linear_label_relaxation_loss``.

It mirrors ``torch.nn.functional.linear_cross_entropy`` (torch 2.15): the same arguments in the
same places, plus ``alpha``. The kernel lives in :mod:`label_relaxation._impl.fused_linear`.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from label_relaxation._impl import validation as check
from label_relaxation._impl.fused import compute_dtype
from label_relaxation._impl.fused_linear import LinearLoss, LinearProblem, default_block_rows
from label_relaxation._impl.validation import Reduction
from label_relaxation.functional import (
    is_dtensor,
    is_transformed,
    label_relaxation_loss,
    prepare_targets,
)


def _check_floating(name: str, tensor: object) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {tensor.dtype}")
    return tensor


def _check_arguments(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    chunk_size: int | None,
) -> None:
    """Metadata checks: types, dtypes and shapes, with ``F.linear``'s meaning of each."""
    _check_floating("input", input)
    _check_floating("linear_weight", linear_weight)
    if input.dim() == 0:
        raise ValueError("input must have shape (..., H) with the features last, got a 0-d tensor")
    hidden = input.shape[-1]
    if linear_weight.dim() != 2 or linear_weight.shape[1] != hidden:
        raise ValueError(
            f"linear_weight must have shape (V, H) with H = input.shape[-1] = {hidden}, as "
            f"nn.Linear(H, V).weight, got shape {tuple(linear_weight.shape)}"
        )
    if linear_weight.shape[0] < 2:
        raise ValueError(
            f"linear_weight must have at least 2 rows (classes), got shape "
            f"{tuple(linear_weight.shape)}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(
            f"linear_weight must have the input's dtype {input.dtype}, got {linear_weight.dtype}"
        )
    if linear_bias is not None:
        _check_floating("linear_bias", linear_bias)
        if linear_bias.shape != linear_weight.shape[:1]:
            raise ValueError(
                f"linear_bias must have shape (V,) = ({linear_weight.shape[0]},), got shape "
                f"{tuple(linear_bias.shape)}"
            )
        if linear_bias.dtype != input.dtype:
            raise TypeError(
                f"linear_bias must have the input's dtype {input.dtype}, got {linear_bias.dtype}"
            )
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target must have shape input.shape[:-1] = {tuple(input.shape[:-1])}, got shape "
            f"{tuple(target.shape)}"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _needs_reference(input: Tensor, alpha: float | Tensor, weight: Tensor | None) -> bool:
    """Where the fused kernel does not apply: transforms, forward AD, gradients of alpha/weight."""
    alpha_grad = isinstance(alpha, Tensor) and alpha.requires_grad
    weight_grad = weight is not None and weight.requires_grad
    transformed = is_transformed(input) and not torch.compiler.is_compiling()
    return transformed or alpha_grad or weight_grad


@overload
def linear_label_relaxation_loss(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    alpha: float | Tensor = ...,
    *,
    linear_bias: Tensor | None = ...,
    weight: Tensor | None = ...,
    ignore_index: int = ...,
    reduction: Reduction = ...,
    chunk_size: int | None = ...,
    validate: bool = ...,
    return_training_fraction: Literal[False] = ...,
) -> Tensor: ...


@overload
def linear_label_relaxation_loss(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    alpha: float | Tensor = ...,
    *,
    linear_bias: Tensor | None = ...,
    weight: Tensor | None = ...,
    ignore_index: int = ...,
    reduction: Reduction = ...,
    chunk_size: int | None = ...,
    validate: bool = ...,
    return_training_fraction: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def linear_label_relaxation_loss(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    alpha: float | Tensor = 0.1,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
    validate: bool = True,
    return_training_fraction: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Label relaxation loss of ``F.linear(input, linear_weight, linear_bias)``, never materialised.

    Equals ``label_relaxation_loss(F.linear(input, linear_weight, linear_bias), target, alpha,
    ...)``, but computes the logits ``chunk_size`` rows at a time together with the loss and the
    gradients, so peak memory is one block of logits instead of ``(tokens, V)``. Rows inside
    the credal set have exactly zero gradient and take no part in the gradient products. The
    arguments mirror ``torch.nn.functional.linear_cross_entropy``.

    Args:
        input: Features ``(..., H)``, e.g. a language model's last hidden states.
        linear_weight: The output layer's weight ``(V, H)``, as ``nn.Linear(H, V).weight``
            (possibly tied to an embedding). Same dtype as ``input``. A ``DTensor`` sharded on
            the classes (``Shard(0)``, tensor parallelism) computes each rank's classes there
            and returns a replicated ``DTensor`` loss (see ``docs/distributed.md``).
        target: Class indices of shape ``input.shape[:-1]``.
        alpha: Relaxation in (0, 1): a float, or a tensor broadcastable to
            ``input.shape[:-1]``.
        linear_bias: Optional bias ``(V,)``.
        weight: Optional class weights ``(V,)``, as in :func:`label_relaxation_loss`.
        ignore_index: Targets equal to this value contribute no loss and no gradient.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``, as in :func:`label_relaxation_loss`.
            With ``"none"`` the backward pass computes the logits a second time (each row's
            incoming gradient must scale it before it enters the weight gradient).
        chunk_size: Rows of logits per block. ``None``: 5·2^20 logits (20 MiB of float32)
            per block on the CPU but at least 128 rows, 2^26 logits on other devices.
        validate: Check target and alpha values (see :func:`label_relaxation_loss`).
        return_training_fraction: Also return the fraction of counted positions still outside
            the credal set (those with a gradient): how much of the batch still trains.

    Returns:
        The loss as :func:`label_relaxation_loss` returns it (float32 for half-precision
        inputs), and with ``return_training_fraction`` a pair ``(loss, fraction)``, the
        fraction a 0-d float32 tensor without gradient.

    Raises:
        TypeError: An argument has an unsupported type or dtype, or the dtypes differ.
        ValueError: A shape does not match, ``alpha`` lies outside (0, 1), ``reduction`` is
            unknown or ``chunk_size`` is not a positive int.
        IndexError: A class index lies outside ``[0, V)`` and is not ``ignore_index``.

    Shape:
        - input: ``(..., H)``.
        - linear_weight: ``(V, H)``; linear_bias: ``(V,)``.
        - target: ``(...)``.
        - output: ``()``, or ``(...)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from label_relaxation import linear_label_relaxation_loss
        >>> hidden = torch.randn(2, 5, 16, requires_grad=True)
        >>> head = torch.nn.Linear(16, 100, bias=False)
        >>> target = torch.randint(0, 100, (2, 5))
        >>> loss = linear_label_relaxation_loss(hidden, head.weight, target, alpha=0.1)
        >>> loss.backward()
        >>> hidden.grad.shape, head.weight.grad.shape
        (torch.Size([2, 5, 16]), torch.Size([100, 16]))
    """
    if is_dtensor(linear_weight):
        from label_relaxation.distributed import dtensor_linear_label_relaxation_loss

        return dtensor_linear_label_relaxation_loss(  # type: ignore[no-any-return]
            input,
            linear_weight,
            target,
            alpha,
            linear_bias=linear_bias,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            chunk_size=chunk_size,
            validate=validate,
            return_training_fraction=return_training_fraction,
        )
    _check_arguments(input, linear_weight, linear_bias, target, chunk_size)
    num_classes = int(linear_weight.shape[0])
    check.check_reduction(reduction)
    check.check_weight(weight, num_classes)
    if _needs_reference(input, alpha, weight):
        if return_training_fraction:
            raise ValueError(
                "return_training_fraction is available where the fused kernel runs, not under "
                "torch.func transforms or with a gradient for alpha or the class weights"
            )
        # The unfused loss serves transforms and these gradients, holding the full logits.
        logits = F.linear(input, linear_weight, linear_bias)
        return label_relaxation_loss(
            logits,
            target,
            alpha,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            validate=validate,
        )
    return fused_linear_loss(
        input,
        linear_weight,
        linear_bias,
        target,
        alpha,
        num_classes=num_classes,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=chunk_size,
        validate=validate,
        return_training_fraction=return_training_fraction,
    )


def fused_linear_loss(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    alpha: float | Tensor,
    *,
    num_classes: int,
    weight: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    chunk_size: int | None,
    validate: bool,
    return_training_fraction: bool,
    vocab_start: int = 0,
    group_name: str = "",
) -> Tensor | tuple[Tensor, Tensor]:
    """The fused kernel on checked arguments; ``linear_weight`` may hold a slice of the classes.

    With ``group_name``, ``linear_weight`` holds the classes ``[vocab_start, vocab_start +
    V_local)`` of ``num_classes``, split across that process group.
    """
    batch_shape = input.shape[:-1]
    targets = prepare_targets(
        batch_shape,
        num_classes,
        compute_dtype(input.dtype),
        target,
        alpha,
        weight,
        ignore_index,
        reduction,
        validate,
    )
    hidden = input.shape[-1]
    problem = LinearProblem(
        input.reshape(-1, hidden),
        linear_weight,
        linear_bias,
        *targets,
        vocab_start=vocab_start,
        group_name=group_name,
    )
    block_rows = chunk_size or default_block_rows(int(linear_weight.shape[0]), input.device)
    reduce = reduction != "none"
    loss: Tensor
    training: Tensor
    loss, training = LinearLoss.apply(*problem, block_rows, reduce)
    if not reduce:
        loss = loss.reshape(batch_shape)
    if not return_training_fraction:
        return loss
    counted = (targets.row_weight != 0).sum().clamp_min(1)
    return loss, (training / counted).to(torch.float32)
