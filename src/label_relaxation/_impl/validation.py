"""Argument checks shared by every loss in the package.

Shape, dtype and Python-scalar checks run on every call: they read only metadata, so they cost
nothing and never break a ``torch.compile`` graph. Checks that must read tensor *values* (target
range, one-hot exactness, alpha range) run only where reading a value is allowed: see
:func:`value_checks_allowed`.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch
from torch import Tensor

Reduction: TypeAlias = Literal["none", "mean", "sum"]


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is tracing this call."""
    return bool(torch._C._are_functorch_transforms_active())


def value_checks_allowed() -> bool:
    """Whether checks that read tensor values may run in Python.

    They may in plain eager mode. Under ``torch.compile`` a host read would break the graph, and
    under ``torch.func`` transforms it is not possible at all; those modes get in-graph
    safeguards instead (see ``docs``: "what is validated where").
    """
    return not torch.compiler.is_compiling() and not functorch_active()


def check_reduction(reduction: str) -> None:
    """Raise ``ValueError`` unless ``reduction`` is one of ``none``, ``mean``, ``sum``."""
    # A literal, not a module-level tuple: under torch.compile each global read is guarded on
    # every call of the compiled code.
    choices = ("none", "mean", "sum")
    if reduction not in choices:
        raise ValueError(f"reduction must be one of {choices}, got {reduction!r}")


def check_logits(logits: object) -> int:
    """Check ``logits`` is a floating tensor of shape ``(..., C)`` with ``C >= 2``; return ``C``."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(
            f"logits must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {logits.dtype}"
        )
    if logits.dim() == 0:
        raise ValueError(
            "logits must have shape (..., C) with the class dimension last, got a 0-d tensor"
        )
    num_classes = logits.shape[-1]
    if num_classes < 2:
        raise ValueError(
            f"logits must have at least 2 classes in its last dimension, "
            f"got shape {tuple(logits.shape)}"
        )
    return int(num_classes)


def check_alpha_float(alpha: float) -> None:
    """Raise ``ValueError`` unless the Python number ``alpha`` lies in the open interval (0, 1)."""
    # A SymFloat is a float that torch.compile traces as a graph input (an alpha schedule).
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, torch.SymFloat)):
        raise TypeError(f"alpha must be a float or a floating tensor, got {type(alpha).__name__}")
    # Comparisons are False for NaN; no math.isnan, which a dynamic float under
    # torch.compile (a changing alpha) cannot trace.
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in the open interval (0, 1), got {alpha!r}")


def check_alpha(alpha: float | Tensor, batch_shape: torch.Size) -> None:
    """Check a float ``alpha``'s value, or a tensor ``alpha``'s dtype and shape."""
    if isinstance(alpha, Tensor):
        check_alpha_tensor(alpha, batch_shape)
    else:
        check_alpha_float(alpha)


def check_alpha_tensor(alpha: Tensor, batch_shape: torch.Size, name: str = "alpha") -> None:
    """Check the dtype and shape of a tensor ``alpha`` (its values are checked separately)."""
    if not alpha.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {alpha.dtype}")
    try:
        broadcast = torch.broadcast_shapes(alpha.shape, batch_shape)  # type: ignore[no-untyped-call]
    except RuntimeError:
        broadcast = None
    if broadcast != batch_shape:
        raise ValueError(
            f"{name} must be a float or a tensor broadcastable to logits.shape[:-1] = "
            f"{tuple(batch_shape)}, got shape {tuple(alpha.shape)}"
        )


def check_alpha_values(alpha: Tensor) -> None:
    """Eager-only: raise ``ValueError`` unless every value of ``alpha`` lies in (0, 1)."""
    inside = (alpha > 0) & (alpha < 1)
    if not bool(inside.all()):
        bad = alpha[~inside].flatten()[0].item()
        raise ValueError(f"alpha must lie in the open interval (0, 1), got a value of {bad!r}")


def check_weight(weight: Tensor | None, num_classes: int) -> None:
    """Check that ``weight`` is ``None`` or a floating tensor of shape ``(C,)``."""
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got dtype {weight.dtype}")
    if weight.shape != (num_classes,):
        raise ValueError(
            f"weight must have shape (C,) = ({num_classes},) to match the logits' last dimension, "
            f"got shape {tuple(weight.shape)}"
        )


def check_target_kind(target: object, logits: Tensor) -> bool:
    """Check the target's type and shape; ``True`` means class indices, ``False`` one-hot."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"a floating (one-hot) target must have the logits' shape {tuple(logits.shape)}, "
                f"got shape {tuple(target.shape)}; class-index targets have shape "
                f"logits.shape[:-1] = {tuple(logits.shape[:-1])}"
            )
        return False
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"target must hold integer class indices or a floating one-hot encoding, "
            f"got dtype {target.dtype}"
        )
    if target.shape != logits.shape[:-1]:
        batch_shape = tuple(logits.shape[:-1])
        raise ValueError(
            f"target of class indices must have shape logits.shape[:-1] = {batch_shape}, "
            f"got shape {tuple(target.shape)}{_class_dim_hint(logits.shape, target.shape)}"
        )
    return True


def _class_dim_hint(logits_shape: torch.Size, target_shape: torch.Size) -> str:
    """A hint when the shapes fit ``nn.CrossEntropyLoss``'s layout, classes in dimension 1.

    Logits ``(N, C, d1, ...)`` with target ``(N, d1, ...)`` (segmentation, say) are the usual
    mistake of code written for cross-entropy.
    """
    if len(logits_shape) < 3 or tuple(target_shape) != (logits_shape[0], *logits_shape[2:]):
        return ""
    return (
        f". The shapes fit nn.CrossEntropyLoss's layout (N, C, d1, ...) with C = "
        f"{logits_shape[1]} in dimension 1; this loss takes the class dimension last: pass "
        f"logits.movedim(1, -1)"
    )


def check_index_values(
    target: Tensor, num_classes: int, ignore_index: int | None, name: str = "target"
) -> None:
    """Eager-only: raise ``IndexError`` for an index outside ``[0, C)`` but ``ignore_index``."""
    in_range = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        in_range |= target == ignore_index
    if not bool(in_range.all()):
        bad = int(target[~in_range].flatten()[0].item())
        allowed = f"[0, {num_classes})"
        if ignore_index is not None:
            allowed += f" or ignore_index={ignore_index}"
        raise IndexError(
            f"Target {bad} is out of bounds: {name} must hold class indices in {allowed}"
        )


def one_hot_rows_ok(target: Tensor, index: Tensor) -> Tensor:
    """Boolean tensor of ``target.shape[:-1]``: whether each row is exactly one-hot at ``index``."""
    nonzero_count = (target != 0).sum(-1)
    at_index = target.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return (nonzero_count == 1) & (at_index == 1)


def check_one_hot_values(target: Tensor, index: Tensor) -> None:
    """Eager-only: raise ``ValueError`` unless the floating target is exactly one-hot."""
    if not bool(one_hot_rows_ok(target, index).all()):
        raise ValueError(
            "a floating target must be exactly one-hot (one entry 1, all others 0); for soft, "
            "label-smoothed or mixup targets use label_relaxation.soft_label_relaxation_loss"
        )


def check_lam_values(lam: Tensor) -> None:
    """Eager-only: raise ``ValueError`` unless every value of the mixup weight lies in [0, 1]."""
    inside = (lam >= 0) & (lam <= 1)
    if not bool(inside.all()):
        bad = lam[~inside].flatten()[0].item()
        raise ValueError(f"lam must lie in [0, 1], got a value of {bad!r}")


def soft_target_tolerance(dtype: torch.dtype) -> float:
    """How far a soft target row's sum may be from 1.

    1e-5 admits float32-normalised targets cast to float64; half-precision targets get four
    ulp of their dtype (3.9e-3 for float16, 3.1e-2 for bfloat16).
    """
    return max(1e-5, 4 * float(torch.finfo(dtype).eps))


def soft_target_invalid_rows(target: Tensor) -> Tensor:
    """Boolean ``target.shape[:-1]``: rows that are not probability distributions."""
    tolerance = soft_target_tolerance(target.dtype)
    sums = target.sum(-1, dtype=torch.float64)
    return ((target < 0).any(-1)) | ((sums - 1).abs() > tolerance) | target.isnan().any(-1)


def check_soft_target_values(target: Tensor, invalid: Tensor | None = None) -> None:
    """Eager-only: raise ``ValueError`` unless every row of ``target`` is a distribution."""
    if invalid is None:
        invalid = soft_target_invalid_rows(target)
    if bool(invalid.any()):
        row = target[invalid][0]
        raise ValueError(
            "target rows must be probability distributions: entries >= 0 that sum to 1 "
            f"(within {soft_target_tolerance(target.dtype):.1e}); got a row with minimum "
            f"{row.min().item():.6g} and sum {row.sum().item():.6g}"
        )
