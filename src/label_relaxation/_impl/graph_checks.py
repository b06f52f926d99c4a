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


# A plain library definition rather than torch.library.custom_op: custom_op's autograd and
# argument handling cost about 18 µs a call here against about 4 µs, which a compiled 64x10 batch
# (about 100 µs in all) would feel. The operator takes the reduced flag, not the mask, so that
# the reduction fuses into the graph's own kernels. It returns nothing: an output flag fed back
# into the loss cost a copy, a metadata check in the wrapper and a kernel boundary (compiled
# 64x10 forward+backward about 10 µs more, torch 2.15, 2-core Xeon).
_LIBRARY = torch.library.Library("label_relaxation", "DEF")  # type: ignore[no-untyped-call]
_LIBRARY.define(  # type: ignore[no-untyped-call]
    "raise_if_invalid(Tensor any_invalid, Tensor[] inputs, str checks, int num_classes, "
    "int? ignore_index, str message) -> ()"
)


def _raise_if_invalid(
    any_invalid: Tensor,
    inputs: list[Tensor],
    checks: str,
    num_classes: int,
    ignore_index: int | None,
    message: str,
) -> None:
    """Raise the eager checks' exception if the 0-d flag ``any_invalid`` is set."""
    if bool(any_invalid):
        for name, tensor in zip(checks.split(","), inputs, strict=True):
            _EAGER_CHECKS[name](tensor, num_classes, ignore_index)
        raise ValueError(message)  # a value that the mask flags but no eager check rejects


def _fake_raise_if_invalid(
    any_invalid: Tensor,
    inputs: list[Tensor],
    checks: str,
    num_classes: int,
    ignore_index: int | None,
    message: str,
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
        inputs: ``(check, tensor)`` pairs naming the eager checks (keys of ``_EAGER_CHECKS``)
            that explain a bad position, in the order eager mode runs them.
        num_classes: ``C``, for index checks.
        ignore_index: The index that is not out of range, or ``None``.
        message: What to raise (``ValueError``) if no eager check rejects a flagged value.
    """
    if invalid.device.type != "cpu":
        torch._assert_async(~invalid.any(), message)
        return
    names = ",".join(name for name, _ in inputs)
    tensors = [tensor.detach() for _, tensor in inputs]
    torch.ops.label_relaxation.raise_if_invalid(
        invalid.any(), tensors, names, num_classes, ignore_index, message
    )
