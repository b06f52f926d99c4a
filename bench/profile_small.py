"""Where a small batch's time goes: operator calls, and the cost of an autograd.Function.

Run from the repository root: ``uv run python bench/profile_small.py``. Prints

* the operator calls of one forward and one forward+backward call of the loss at 64x10
  float32 (``torch.profiler``, ATen operators only), next to cross-entropy's: at these sizes a
  call costs what its operator calls cost;
* the median time of a trivial ``autograd.Function`` (one ``sum``) in the ``forward(ctx, ...)``
  form and with a separate ``setup_context``, forward and forward+backward: the reason the
  fused node uses the first form;
* ``torch.utils.benchmark`` medians of the loss (function and module) and cross-entropy at
  64x10 and 128x10, forward and forward+backward;
* at 64x10 without a gradient, the ATen calls of the forward route through cross-entropy
  (where it serves: alpha >= 0.1, at most 128 classes) timed alone, no Python of the package
  around them, next to the whole function and cross-entropy's forward: the least any route
  made of these calls can cost.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark

from label_relaxation import LabelRelaxationLoss, label_relaxation_loss
from label_relaxation._impl.small import _constants
from label_relaxation.tools.benchmark import quiet_profiler


def operator_calls(
    fn: Any, logits: torch.Tensor, target: torch.Tensor, backward: bool
) -> Counter[str]:
    """Top-level ATen operator calls of one call of ``fn``."""
    leaf = logits.clone().requires_grad_(backward)
    fn(leaf, target)  # warm-up
    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = fn(leaf, target)
        if backward:
            loss.backward()
    calls: Counter[str] = Counter()
    for event in prof.events():
        if event.name.startswith("aten::") and event.cpu_parent is None:
            calls[event.name] += 1
    return calls


class WithContext(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        return x.sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.expand(4, 10)


class WithSetupContext(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.sum()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.expand(4, 10)


def median_us(statement: str, min_run_time: float = 0.5, **names: Any) -> float:
    """Median time of ``statement`` in µs, in blocks of at least ``min_run_time`` seconds."""
    timer = benchmark.Timer(statement, globals=names)
    return float(timer.blocked_autorange(min_run_time=min_run_time).median * 1e6)


def main() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(64, 10), torch.randint(0, 10, (64,))

    def relaxation(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return label_relaxation_loss(z, y, 0.1)

    for backward in (False, True):
        for name, fn in (("label relaxation", relaxation), ("cross-entropy", F.cross_entropy)):
            calls = operator_calls(fn, logits, target, backward)
            kind = "forward+backward" if backward else "forward"
            print(f"{name}, {kind}: {sum(calls.values())} operator calls")
            print("   ", ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in calls.items()))

    x = torch.randn(4, 10, requires_grad=True)
    for cls in (WithContext, WithSetupContext):
        fwd = median_us("cls.apply(x)", cls=cls, x=x)
        both = median_us("cls.apply(x).backward()", cls=cls, x=x)
        print(f"{cls.__name__}: apply {fwd:.1f} us, apply+backward {both:.1f} us")

    criterion = LabelRelaxationLoss(0.1)
    for rows, classes in ((64, 10), (128, 10)):
        z, y = torch.randn(rows, classes), torch.randint(0, classes, (rows,))
        names = {"z": z, "y": y, "F": F, "lr": label_relaxation_loss, "module": criterion}
        for label, call in (
            ("cross-entropy", "F.cross_entropy(x, y)"),
            ("function", "lr(x, y, 0.1)"),
            ("module", "module(x, y)"),
        ):
            fwd = median_us(call.replace("x", "z"), **names)
            both = median_us(f"x = z.clone().requires_grad_(); {call}.backward()", **names)
            print(f"{rows}x{classes} {label}: forward {fwd:.1f} us, forward+backward {both:.1f} us")
    forward_route_alone()


# The forward route's calls at 64x10, alpha 0.1, mean over 64 rows: the target read (is any row
# ignored?), cross-entropy per row, r = -expm1(-ce) and log r, the closed form with the row
# weight folded into 0-d constants, rows inside the set set to 0, the sum.
FORWARD_ROUTE = """
int(y.min())
ce = F.cross_entropy(z, y, reduction="none")
r = ce.neg().expm1_().neg_()
loss = torch.addcmul(offset, ce, one_minus_alpha).addcmul_(r.log(), neg_alpha)
loss.masked_fill_(torch.le(ce, inside), 0.0).sum()
"""


def forward_route_alone() -> None:
    """Print the forward route's ATen calls alone against the function and cross-entropy."""
    z, y = torch.randn(64, 10) * 3, torch.randint(0, 10, (64,))
    # The route's own 0-d operands: alpha 0.1, the mean's 1/64 folded in.
    const = _constants(0.1, 1 / 64, torch.float32)
    constants = {
        "offset": const.offset_w,
        "one_minus_alpha": const.one_minus_alpha_w,
        "neg_alpha": const.neg_alpha_w,
        "inside": const.inside_cross_entropy,
    }
    names = {"z": z, "y": y, "F": F, "torch": torch, "lr": label_relaxation_loss, **constants}
    with torch.no_grad():
        alone = median_us(FORWARD_ROUTE, **names)
        whole = median_us("lr(z, y, 0.1)", **names)
        ce = median_us("F.cross_entropy(z, y)", **names)
    print(
        f"64x10 forward: route's ATen calls alone {alone:.1f} us "
        f"({alone / ce:.2f}x cross-entropy), function {whole:.1f} us ({whole / ce:.2f}x), "
        f"cross-entropy {ce:.1f} us"
    )


if __name__ == "__main__":
    main()
