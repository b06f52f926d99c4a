"""Value checks inside ``torch.compile`` graphs that raise a Python exception, never abort.

Under ``torch.compile`` a check cannot read a value in Python without breaking the graph, and
``torch._assert_async`` is no way out on the CPU: Inductor places it inside the kernel's OpenMP
parallel region once the batch is large enough for several threads, and a C++ exception cannot
leave that region, so the whole process dies with SIGABRT (seen at 4096x512 on 2 threads).

The graph therefore reduces a boolean mask of invalid positions to one flag (fused with the rest
of the loss) and hands it to the operator ``label_relaxation::raise_if_invalid``, which Inductor
calls from the graph's Python wrapper like any opaque operator. When the flag is set the
operator reruns the eager checks, so the exception has the same type and message as in eager
mode. The operator returns nothing and is registered as having a side effect
(``torch.fx.node.has_side_effect``), so no compiler pass drops it; the compiled call raises
before it returns a loss. Reading one flag is free on the CPU; on other devices it would be a
host sync, so there the graph keeps ``torch._assert_async`` (a device-side assert, as for
cross-entropy's own index checks on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from label_relaxation._impl import validation as check

EagerCheck = Callable[[Tensor, int, "int | None"], None]

# Each check takes (tensor, num_classes, ignore_index) and raises as in eager mode.
_EAGER_CHECKS: dict[str, EagerCheck] = {
    "target": lambda t, c, ignore: check.check_index_values(t, c, ignore),
    "target_a": lambda t, c, ignore: check.check_index_values(t, c, None, name="target_a"),
    "target_b": lambda t, c, ignore: check.check_index_values(t, c, None, name="target_b"),
    "one_hot": lambda t, c, ignore: check.check_one_hot_values(t, t.argmax(-1)),
    "soft_target": lambda t, c, ignore: check.check_soft_target_values(t),
    "alpha": lambda t, c, ignore: check.check_alpha_values(t),
    "lam": lambda t, c, ignore: check.check_lam_values(t),
}
_CHECK_NAMES = tuple(_EAGER_CHECKS)
_MAX_INPUTS = 4

# What each loss raises (ValueError) for a flagged value that no eager check rejects. The
# operator receives the message's position here, not the text: a fixed table, so that a compiled
# graph loaded from Inductor's cache in another process names the same message.
LABEL_RELAXATION_MESSAGE = (
    "label_relaxation_loss: target holds an out-of-range class index, a floating target that is "
    "not exactly one-hot, or alpha outside (0, 1)"
)
SOFT_MESSAGE = (
    "soft_label_relaxation_loss: a target row is not a probability distribution, or alpha lies "
    "outside (0, 1)"
)
MIXUP_MESSAGE = (
    "mixup_label_relaxation_loss: a class index out of range, lam outside [0, 1] or alpha "
    "outside (0, 1)"
)
_MESSAGES = (LABEL_RELAXATION_MESSAGE, SOFT_MESSAGE, MIXUP_MESSAGE)


# A plain library definition rather than torch.library.custom_op: custom_op's autograd and
# argument handling cost about 18 µs a call here against about 4 µs, which a compiled 64x10 batch
# (about 100 µs in all) would feel. The operator takes the reduced flag, not the mask, so that
# the reduction fuses into the graph's own kernels. It returns nothing: an output flag fed back
# into the loss cost a copy, a metadata check in the wrapper and a kernel boundary (compiled
# 64x10 forward+backward about 10 µs more, torch 2.15, 2-core Xeon). Its arguments are tensors
# and integers (the checks and the message by number): with a tensor list and two strings a
# compiled 64x10 forward took 3-4 µs more (51.7-53.9 against 48.8-49.8 µs for the call of a
# graph with one kernel and the operator, medians of 41 interleaved blocks, two runs).
_LIBRARY = torch.library.Library("label_relaxation", "DEF")  # type: ignore[no-untyped-call]
_LIBRARY.define(  # type: ignore[no-untyped-call]
    "raise_if_invalid(Tensor any_invalid, Tensor first, Tensor? second, Tensor? third, "
    "Tensor? fourth, int checks, int num_classes, int? ignore_index, int message) -> ()"
)


def _encode_checks(names: Sequence[str]) -> int:
    """The check names as one integer: three bits per name, the first lowest."""
    code = 0
    for position, name in enumerate(names):
        code |= (_CHECK_NAMES.index(name) + 1) << (3 * position)
    return code


def _decode_checks(code: int) -> list[str]:
    """The check names of :func:`_encode_checks`, in order."""
    names = []
    while code:
        names.append(_CHECK_NAMES[(code & 7) - 1])
        code >>= 3
    return names


def _raise_if_invalid(
    any_invalid: Tensor,
    first: Tensor,
    second: Tensor | None,
    third: Tensor | None,
    fourth: Tensor | None,
    checks: int,
    num_classes: int,
    ignore_index: int | None,
    message: int,
) -> None:
    """Raise the eager checks' exception if the 0-d flag ``any_invalid`` is set."""
    if bool(any_invalid):
        tensors = [tensor for tensor in (first, second, third, fourth) if tensor is not None]
        for name, tensor in zip(_decode_checks(checks), tensors, strict=True):
            _EAGER_CHECKS[name](tensor, num_classes, ignore_index)
        raise ValueError(_MESSAGES[message])  # a value the mask flags but no eager check rejects


def _fake_raise_if_invalid(
    any_invalid: Tensor,
    first: Tensor,
    second: Tensor | None,
    third: Tensor | None,
    fourth: Tensor | None,
    checks: int,
    num_classes: int,
    ignore_index: int | None,
    message: int,
) -> None:
    return None


_LIBRARY.impl("raise_if_invalid", _raise_if_invalid, "CompositeExplicitAutograd")  # type: ignore[no-untyped-call]
torch.library.register_fake("label_relaxation::raise_if_invalid", _fake_raise_if_invalid)
torch.fx.node.has_side_effect(torch.ops.label_relaxation.raise_if_invalid.default)


def raise_if_invalid(
    invalid: Tensor,
    inputs: Sequence[tuple[str, Tensor]],
    num_classes: int,
    ignore_index: int | None,
    message: str,
) -> None:
    """Inside a compiled graph: raise where eager mode would.

    Args:
        invalid: Boolean mask of the positions whose values are bad.
        inputs: One to four ``(check, tensor)`` pairs naming the eager checks (keys of
            ``_EAGER_CHECKS``) that explain a bad position, in the order eager mode runs them.
        num_classes: ``C``, for index checks.
        ignore_index: The index that is not out of range, or ``None``.
        message: What to raise (``ValueError``) if no eager check rejects a flagged value: one
            of the messages defined in this module.
    """
    if invalid.device.type != "cpu":
        torch._assert_async(~invalid.any(), message)
        return
    if not 1 <= len(inputs) <= _MAX_INPUTS:
        raise ValueError(f"raise_if_invalid takes 1 to {_MAX_INPUTS} inputs, got {len(inputs)}")
    tensors: list[Tensor | None] = [tensor.detach() for _, tensor in inputs]
    tensors += [None] * (_MAX_INPUTS - len(tensors))
    torch.ops.label_relaxation.raise_if_invalid(
        invalid.any(),
        *tensors,
        _encode_checks([name for name, _ in inputs]),
        num_classes,
        ignore_index,
        _MESSAGES.index(message),
    )
