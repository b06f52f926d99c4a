"""Bad-input cases run in a child process (see test_bad_input_processes.py).

``python -m tests.bad_input_cases SPEC [SPEC ...]``, each ``SPEC`` being
``LOSS,MODE,ROWS,CLASSES,THREADS``, runs every bad value of one loss in one mode per spec, with
one compiled graph per spec (Dynamo is reset between specs), and prints one JSON line per case:
the spec, the exception's type and message, or the per-row losses' NaN pattern where no
exception can be raised (``torch.func``); then a line marking the spec done. Several specs share
one process because starting one (importing torch, and Dynamo for the compiled modes) costs
15-20 s on 2 cores. A process killed by a signal prints nothing more: its return code tells the
parent, and the spec without its done line is the one that killed it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch
from torch import Tensor

import label_relaxation as lr

Case = tuple[str, Callable[[], Tensor]]


def _index_cases(rows: int, classes: int, fn: Callable[..., Tensor], module: bool) -> list[Case]:
    logits = torch.randn(rows, classes, requires_grad=True)
    good = torch.randint(0, classes, (rows,))
    alpha = torch.full((rows,), 0.1)

    def call(target: Tensor, alpha_: Tensor | None = None) -> Tensor:
        if module:
            return fn(logits, target)
        return fn(logits, target, alpha if alpha_ is None else alpha_)

    def bad(value: int) -> Tensor:
        target = good.clone()
        target[rows // 2] = value
        return target

    bad_alpha = alpha.clone()
    bad_alpha[rows - 1] = 1.5
    cases: list[Case] = [
        ("good", lambda: call(good)),
        ("target too large", lambda: call(bad(classes + 9999))),
        ("target negative", lambda: call(bad(-5))),
        ("target equal to C", lambda: call(bad(classes))),
    ]
    if not module:
        cases.append(("alpha out of range", lambda: call(good, bad_alpha)))
    return cases


def _one_hot_cases(rows: int, classes: int, fn: Callable[..., Tensor]) -> list[Case]:
    logits = torch.randn(rows, classes, requires_grad=True)
    good = torch.nn.functional.one_hot(torch.randint(0, classes, (rows,)), classes).float()
    not_one_hot = good.clone()
    not_one_hot[rows // 2] *= 0.5
    return [
        ("good", lambda: fn(logits, good, 0.1)),
        ("one-hot not exact", lambda: fn(logits, not_one_hot, 0.1)),
    ]


def _soft_cases(rows: int, classes: int, fn: Callable[..., Tensor], module: bool) -> list[Case]:
    logits = torch.randn(rows, classes, requires_grad=True)
    good = torch.softmax(torch.randn(rows, classes), -1)
    alpha = torch.full((rows,), 0.1)
    negative = good.clone()
    negative[rows // 2, 0] = -0.25
    negative[rows // 2, 1] += 0.25
    wrong_sum = good.clone()
    wrong_sum[rows // 2] *= 1.01
    bad_alpha = alpha.clone()
    bad_alpha[0] = -0.5

    def call(target: Tensor, alpha_: Tensor = alpha) -> Tensor:
        return fn(logits, target) if module else fn(logits, target, alpha_)

    cases: list[Case] = [
        ("good", lambda: call(good)),
        ("soft target negative", lambda: call(negative)),
        ("soft target sum", lambda: call(wrong_sum)),
    ]
    if not module:
        cases.append(("alpha out of range", lambda: call(good, bad_alpha)))
    return cases


def _mixup_cases(rows: int, classes: int, fn: Callable[..., Tensor], module: bool) -> list[Case]:
    logits = torch.randn(rows, classes, requires_grad=True)
    a = torch.randint(0, classes, (rows,))
    b = torch.randint(0, classes, (rows,))
    lam = torch.rand(rows)
    alpha = torch.full((rows,), 0.1)

    def with_value(t: Tensor, value: float) -> Tensor:
        t = t.clone()
        t[rows // 2] = value
        return t

    def call(a_: Tensor = a, b_: Tensor = b, lam_: Tensor = lam, alpha_: Tensor = alpha) -> Tensor:
        return fn(logits, a_, b_, lam_) if module else fn(logits, a_, b_, lam_, alpha_)

    cases: list[Case] = [
        ("good", lambda: call()),
        ("target_a too large", lambda: call(a_=with_value(a, classes + 9999))),
        ("target_b negative", lambda: call(b_=with_value(b, -3))),
        ("lam out of range", lambda: call(lam_=with_value(lam, 1.5))),
    ]
    if not module:
        cases.append(("alpha out of range", lambda: call(alpha_=with_value(alpha, 0.0))))
    return cases


def _function(loss: str, mode: str) -> tuple[Callable[..., Tensor], bool]:
    """The callable under test for ``loss`` in ``mode``; ``True`` if it is a module."""
    module = mode == "compiled-module"
    if module:
        modules = {
            "index": lr.LabelRelaxationLoss(0.1),
            "soft": lr.SoftLabelRelaxationLoss(0.1),
            "mixup": lr.MixupLabelRelaxationLoss(0.1),
        }
        return torch.compile(modules[loss], fullgraph=True), True
    functions: dict[str, Callable[..., Tensor]] = {
        "index": lr.label_relaxation_loss,
        "one_hot": lr.label_relaxation_loss,
        "soft": lr.soft_label_relaxation_loss,
        "mixup": lr.mixup_label_relaxation_loss,
    }
    fn = functions[loss]
    if mode == "eager":
        return fn, False
    if mode == "compiled":
        return torch.compile(fn, fullgraph=True), False
    if mode == "compiled-dynamic":
        return torch.compile(fn, fullgraph=True, dynamic=True), False
    raise ValueError(f"unknown mode {mode!r}")


def _vmap_rows(loss: str, rows: int, classes: int) -> None:
    """Per-sample losses and gradients under vmap(grad): bad positions give NaN, others not."""
    logits = torch.randn(rows, classes)
    bad_rows = [rows // 3, rows // 2]
    per_sample: Callable[..., Tensor]
    if loss == "index":
        target = torch.randint(0, classes, (rows,))
        target[bad_rows[0]] = -5
        target[bad_rows[1]] = classes + 9999
        inputs: tuple[Tensor, ...] = (target,)

        def per_sample(z: Tensor, t: Tensor) -> Tensor:
            return lr.label_relaxation_loss(z, t, 0.1)

    elif loss == "soft":
        target = torch.softmax(torch.randn(rows, classes), -1)
        target[bad_rows[0], 0] = -0.5
        target[bad_rows[1]] *= 1.01
        inputs = (target,)

        def per_sample(z: Tensor, t: Tensor) -> Tensor:
            return lr.soft_label_relaxation_loss(z, t, 0.1)

    elif loss == "mixup":
        a = torch.randint(0, classes, (rows,))
        b = torch.randint(0, classes, (rows,))
        lam = torch.rand(rows)
        a[bad_rows[0]] = classes + 9999
        lam[bad_rows[1]] = 1.5
        inputs = (a, b, lam)

        def per_sample(z: Tensor, a_: Tensor, b_: Tensor, lam_: Tensor) -> Tensor:
            return lr.mixup_label_relaxation_loss(z, a_, b_, lam_, 0.1)

    else:
        raise ValueError(f"no vmap cases for {loss!r}")
    values = torch.func.vmap(per_sample)(logits, *inputs)
    grads = torch.func.vmap(torch.func.grad(per_sample))(logits, *inputs)
    nan_rows = torch.isnan(values).nonzero().flatten().tolist()
    nan_grad_rows = torch.isnan(grads).any(-1).nonzero().flatten().tolist()
    print(json.dumps({"case": "vmap", "nan_rows": nan_rows, "nan_grad_rows": nan_grad_rows}))
    sys.stdout.flush()


def run(loss: str, mode: str, rows: int, classes: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if mode == "vmap":
        _vmap_rows(loss, rows, classes)
        return
    if mode != "eager":
        import torch._dynamo as dynamo  # loaded by the compiled modes only

        dynamo.reset()  # each spec compiles its own graph, as in a process of its own
    fn, module = _function(loss, mode)
    if loss == "index":
        cases = _index_cases(rows, classes, fn, module)
    elif loss == "one_hot":
        cases = _one_hot_cases(rows, classes, fn)
    elif loss == "soft":
        cases = _soft_cases(rows, classes, fn, module)
    else:
        cases = _mixup_cases(rows, classes, fn, module)
    for name, case in cases:
        report: dict[str, object] = {"case": name}
        try:
            value = case()
            value.backward()
            report["finite"] = bool(torch.isfinite(value).all())
        except Exception as error:
            report["error"] = type(error).__name__
            report["message"] = str(error)
        print(json.dumps(report), flush=True)


def run_specs(specs: list[str]) -> None:
    """Run each ``LOSS,MODE,ROWS,CLASSES,THREADS`` spec, its lines tagged with the spec."""
    for spec in specs:
        print(json.dumps({"spec": spec}), flush=True)
        loss, mode, rows, classes, threads = spec.split(",")
        run(loss, mode, int(rows), int(classes), int(threads))
        print(json.dumps({"done": spec}), flush=True)


if __name__ == "__main__":
    run_specs(sys.argv[1:])
