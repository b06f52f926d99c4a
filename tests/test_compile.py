"""torch.compile: no graph breaks, no recompiles for alpha or shapes, safe under bad input.

Most tests use the aot_eager backend (the traced graph is the point, and it compiles in about
a second); those marked `inductor` compile real kernels, one or more per entry point.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from label_relaxation import LabelRelaxationLoss, label_relaxation_loss


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def loss_and_grad(fn, logits: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, *args)
    loss.sum().backward()
    assert leaf.grad is not None
    return loss.detach(), leaf.grad


CASES = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "weight+ignore": {"weight": torch.rand(11) + 0.5, "ignore_index": 0},
}


# Rows narrower and wider than compiled.VALUE_COMPARE_MIN_CLASSES: the target told apart by
# class index, and the row maximum by value.
@pytest.mark.parametrize("classes", [11, 70])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("target_kind", ["index", "one_hot"])
@pytest.mark.parametrize("alpha_kind", ["float", "per_sample"])
def test_fullgraph_matches_eager(
    case: str, target_kind: str, alpha_kind: str, classes: int
) -> None:
    kwargs = dict(CASES[case])
    if target_kind == "one_hot" and "ignore_index" in kwargs:
        pytest.skip("ignore_index does not apply to one-hot targets")
    if "weight" in kwargs:
        kwargs["weight"] = torch.rand(classes) + 0.5
    logits = torch.randn(2, 3, classes) * 3
    target = torch.randint(0, classes, (2, 3))
    target[0, 0] = 0
    logits[1, 1, 4] = logits[1, 1, 7] = logits[1, 1].max() + 1  # the target among tied maxima
    target[1, 1] = 4
    if target_kind == "one_hot":
        target = torch.nn.functional.one_hot(target, classes).float()
    alpha = 0.15 if alpha_kind == "float" else torch.rand(2, 3) * 0.4 + 0.01

    def fn(z: torch.Tensor, y: torch.Tensor, a: float | torch.Tensor) -> torch.Tensor:
        return label_relaxation_loss(z, y, a, **kwargs)  # type: ignore[arg-type]

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    loss_c, grad_c = loss_and_grad(compiled, logits, target, alpha)
    loss_e, grad_e = loss_and_grad(fn, logits, target, alpha)
    assert counter.frame_count == 1
    torch.testing.assert_close(loss_c, loss_e, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad_c, grad_e, rtol=2e-6, atol=1e-7)


def test_module_alpha_schedule_compiles_once() -> None:
    criterion = LabelRelaxationLoss(0.1)
    # aot_eager runs AOTAutograd's passes too, so a restarted analysis would count twice.
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(criterion, fullgraph=True, backend=counter)
    logits = torch.randn(8, 6) * 3
    target = torch.randint(0, 6, (8,))
    for alpha in (0.1, 0.05, 0.2, 0.3, 0.01, 0.4):
        criterion.alpha = alpha
        expected = label_relaxation_loss(logits, target, alpha)
        torch.testing.assert_close(compiled(logits, target), expected, rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1


def test_float_alpha_schedule_through_the_functional_compiles_twice() -> None:
    """A Python float alpha that changes: Dynamo compiles the first value as a constant and the
    second as a dynamic input, and that graph must serve every later value (math.log on the
    dynamic float once pinned each value: one recompile per alpha)."""
    counter = CompileCounterWithBackend("aot_eager")

    def fn(z: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
        return label_relaxation_loss(z, y, alpha)

    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    logits = torch.randn(8, 6) * 3
    target = torch.randint(0, 6, (8,))
    for alpha in (0.1, 0.05, 0.2, 0.3, 0.01, 0.4):
        expected = label_relaxation_loss(logits, target, alpha)
        torch.testing.assert_close(compiled(logits, target, alpha), expected, rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 2


def test_tensor_alpha_through_the_functional_compiles_once() -> None:
    counter = CompileCounter()
    compiled = torch.compile(label_relaxation_loss, fullgraph=True, backend=counter)
    logits = torch.randn(8, 6) * 3
    target = torch.randint(0, 6, (8,))
    for alpha in (0.1, 0.05, 0.2, 0.3, 0.01, 0.4):
        a = torch.tensor(alpha)
        torch.testing.assert_close(
            compiled(logits, target, a), label_relaxation_loss(logits, target, alpha)
        )
    assert counter.frame_count == 1


def test_changing_batch_and_sequence_length() -> None:
    criterion = LabelRelaxationLoss(0.1, ignore_index=-100)
    shapes = [(2, 5), (3, 7), (4, 9), (5, 3), (6, 11)]

    automatic = CompileCounter()
    compiled = torch.compile(criterion, backend=automatic)
    for batch, seq in shapes:
        logits = torch.randn(batch, seq, 13)
        target = torch.randint(0, 13, (batch, seq))
        torch.testing.assert_close(
            compiled(logits, target), criterion(logits, target), rtol=1e-6, atol=1e-7
        )
    # The first shape compiles static; the second triggers the one automatic-dynamic recompile.
    assert automatic.frame_count <= 2

    torch._dynamo.reset()
    marked = CompileCounter()
    compiled = torch.compile(criterion, backend=marked)
    for batch, seq in shapes:
        logits = torch.randn(batch, seq, 13)
        target = torch.randint(0, 13, (batch, seq))
        torch._dynamo.mark_dynamic(logits, 0)
        torch._dynamo.mark_dynamic(logits, 1)
        torch._dynamo.mark_dynamic(target, 0)
        torch._dynamo.mark_dynamic(target, 1)
        torch.testing.assert_close(
            compiled(logits, target), criterion(logits, target), rtol=1e-6, atol=1e-7
        )
    assert marked.frame_count == 1

    torch._dynamo.reset()
    dynamic = CompileCounter()
    compiled = torch.compile(criterion, backend=dynamic, dynamic=True)
    for batch, seq in shapes:
        logits = torch.randn(batch, seq, 13)
        target = torch.randint(0, 13, (batch, seq))
        torch.testing.assert_close(
            compiled(logits, target), criterion(logits, target), rtol=1e-6, atol=1e-7
        )
    assert dynamic.frame_count == 1


def test_autocast_bfloat16_compiled() -> None:
    linear = torch.nn.Linear(8, 10)
    x = torch.randn(16, 8)
    target = torch.randint(0, 10, (16,))

    def step(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return label_relaxation_loss(linear(x), target, 0.1)

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, target)
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
    torch.testing.assert_close(loss, step(x, target), rtol=1e-5, atol=1e-6)


@pytest.mark.inductor
def test_inductor_functional_with_ignore_index_and_bad_target() -> None:
    """Real Inductor kernels: ignored positions, weights, gradient; then an out-of-range index.

    On the CPU an out-of-range read inside an Inductor kernel aborts the process; every index we
    read is clamped into range first, and the bad value raises the eager IndexError through the
    in-graph check (label_relaxation::raise_if_invalid).
    """
    weight = torch.rand(7) + 0.5

    def fn(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return label_relaxation_loss(z, y, 0.1, weight=weight)

    compiled = torch.compile(fn, fullgraph=True)
    logits = torch.randn(64, 7) * 3
    target = torch.randint(0, 7, (64,))
    target[::5] = -100
    loss_c, grad_c = loss_and_grad(compiled, logits, target)
    loss_e, grad_e = loss_and_grad(fn, logits, target)
    torch.testing.assert_close(loss_c, loss_e, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad_c, grad_e, rtol=2e-6, atol=1e-7)
    assert bool((grad_c[::5] == 0).all())

    bad = target.clone()
    bad[3] = 7
    with pytest.raises(IndexError, match=r"Target 7 is out of bounds: target must hold class"):
        compiled(logits, bad)
    bad[3] = -5
    with pytest.raises(IndexError, match=r"Target -5 is out of bounds"):
        compiled(logits, bad)


@pytest.mark.inductor
def test_inductor_module_token_level() -> None:
    criterion = LabelRelaxationLoss(0.1, ignore_index=-100)
    compiled = torch.compile(criterion, fullgraph=True)
    logits = torch.randn(2, 8, 50) * 2
    target = torch.randint(0, 50, (2, 8))
    target[:, -2:] = -100
    loss_c, grad_c = loss_and_grad(compiled, logits, target)
    loss_e, grad_e = loss_and_grad(criterion, logits, target)
    torch.testing.assert_close(loss_c, loss_e, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad_c, grad_e, rtol=2e-6, atol=1e-7)
    criterion.alpha = 0.3
    torch.testing.assert_close(
        compiled(logits, target), criterion(logits, target), rtol=2e-6, atol=1e-7
    )


@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_compiled_kernel_matches_float64_reference(scale: float) -> None:
    """What torch.compile runs (the closed form with its gradient written out) against the
    explicit float64 projection, with the tolerances of tests/test_values.py."""
    from tests.test_values import assert_matches_reference

    logits = torch.randn(64, 33) * scale
    logits[:4] = torch.tensor([1e3, -5e3, 3e4, 0.0])[:, None] + torch.randn(4, 33)
    target = torch.randint(0, 33, (64,))

    def fn(z: torch.Tensor) -> torch.Tensor:
        return label_relaxation_loss(z, target, 0.1, reduction="none")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaf = logits.clone().requires_grad_()
    loss = compiled(leaf)
    loss.sum().backward()
    assert leaf.grad is not None
    assert_matches_reference(logits, target, 0.1, "compiled", loss.detach(), leaf.grad)


def _compiled_none(target: torch.Tensor, alpha: float, backend: str = "aot_eager"):  # type: ignore[no-untyped-def]
    def fn(z: torch.Tensor) -> torch.Tensor:
        return label_relaxation_loss(z, target, alpha, reduction="none")

    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)]
)
def test_compiled_kernel_at_ties_with_the_maximum(backend: str) -> None:
    """The compiled forward tells the classes at the row maximum apart by value: rows whose
    maximum is shared by the target and others, shared by non-targets only, all-equal rows and
    a target alone at the maximum must all match the float64 projection (Inductor's generated
    compare included)."""
    from tests.test_values import assert_matches_reference

    logits = torch.randn(8, 6)
    logits[0, [0, 3]] = 4.0  # target 0 shares the maximum with class 3
    logits[1, [1, 2, 5]] = 2.5  # target 0 below a three-way tie
    logits[2] = 0.7  # all classes equal
    logits[3, 0] = 9.0  # target alone at the maximum, deep inside the set
    logits[4, [0, 1, 2]] = 1.0e3  # large equal maxima
    logits[5, 4] = 3.0
    logits[5, 0] = 3.0  # target 0 ties the maximum at a later class
    target = torch.tensor([0, 0, 2, 0, 1, 0, 3, 5])
    for alpha in (0.1, 0.6):
        leaf = logits.clone().requires_grad_()
        loss = _compiled_none(target, alpha, backend)(leaf)
        loss.sum().backward()
        assert leaf.grad is not None
        assert_matches_reference(logits, target, alpha, "compiled", loss.detach(), leaf.grad)


@pytest.mark.parametrize("alpha", [1e-5, 1e-3])
def test_compiled_kernel_relative_precision_just_outside_the_set(alpha: float) -> None:
    """As tests/test_values.py asks of the eager kernels: the non-target mass is never 1 - p_y,
    so the loss keeps its relative precision where it is far smaller than its terms."""
    from tests.reference import projected_kl
    from tests.test_values import rows_just_outside

    logits = rows_just_outside(alpha)
    target = torch.zeros(logits.shape[0], dtype=torch.long)
    loss = _compiled_none(target, alpha)(logits)
    reference = projected_kl(logits, target, alpha)
    relative = ((loss.double() - reference).abs() / reference).max()
    assert relative <= 5e-5, f"max relative loss error {relative:.2e}"


def test_dynamic_batch_across_the_small_kernel_bound_compiles_once() -> None:
    """With dynamic shapes, batches below and above the eager small-input kernel's size bound
    (SMALL_ELEMENTS logits) share one graph: that bound is an eager decision and must not become
    a guard (it once did, and a batch across it recompiled)."""
    from label_relaxation._impl import small as _small

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(
        lambda z, y: label_relaxation_loss(z, y, 0.1), backend=counter, dynamic=True
    )
    rows_at_bound = _small.SMALL_ELEMENTS // 10
    for rows in (64, 128, rows_at_bound - 1, rows_at_bound + 1):
        logits = torch.randn(rows, 10) * 2
        target = torch.randint(0, 10, (rows,))
        expected = label_relaxation_loss(logits, target, 0.1)
        torch.testing.assert_close(compiled(logits, target), expected, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_compiled_kernel_refuses_double_backward() -> None:
    """No silent zero Hessian: compiled code refuses double backward with a clear error."""
    compiled = torch.compile(
        lambda z, y: label_relaxation_loss(z, y, 0.1), fullgraph=True, backend="aot_eager"
    )
    leaf = torch.randn(4, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(
        compiled(leaf, torch.tensor([0, 1, 2, 3])), leaf, create_graph=True
    )
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("classes", [5, 70])
@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)]
)
def test_rows_with_infinities_match_eager(backend: str, classes: int) -> None:
    """Masked vocabularies, a row of only -inf that is ignored, +inf and NaN maxima: the
    compiled closed form gives what eager mode gives, NaN where eager gives NaN."""
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor(
        [
            [-inf, 2.0, -inf, -inf, -inf],  # only the target is finite: inside the set
            [0.0, -inf, 1.0, -inf, 0.5],  # part of the vocabulary masked
            [-inf, -inf, -inf, -inf, -inf],  # ignored below
            [1.0, inf, 0.0, 2.0, 3.0],  # a +inf maximum
            [1.0, 2.0, nan, 0.0, 0.0],
            [1e4, -1e4, 0.0, 3.0, 2.0],  # saturated, target far below the maximum
        ]
    )
    target = torch.tensor([1, 2, -100, 0, 1, 1])
    # Wider rows: the same rows padded with classes far below (-inf in the -inf rows).
    pad = torch.where(torch.isneginf(logits[:, :1]), -inf, -5.0).expand(-1, classes - 5)
    logits = torch.cat([logits, pad], -1)

    def fn(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return label_relaxation_loss(z, y, 0.1, reduction="none")

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    loss_c, grad_c = loss_and_grad(compiled, logits, target)
    loss_e, grad_e = loss_and_grad(fn, logits, target)
    torch.testing.assert_close(loss_c, loss_e, rtol=2e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(grad_c, grad_e, rtol=2e-6, atol=1e-7, equal_nan=True)
    assert loss_c[0] == 0 and bool((grad_c[0] == 0).all()) and bool((grad_c[2] == 0).all())
    assert bool(loss_c[3].isnan()) and bool(loss_c[4].isnan())


IMPORT_WITHOUT_DYNAMO = """
import sys
import torch
import label_relaxation as lr
from label_relaxation import functional

logits = torch.randn(6, 5, requires_grad=True)
target = torch.tensor([0, 1, 2, 3, 4, 0])
lr.label_relaxation_loss(logits, target).backward()
lr.LabelRelaxationLoss(0.2)(logits, target).backward()
lr.soft_label_relaxation_loss(logits, torch.softmax(torch.randn(6, 5), -1)).backward()
lr.mixup_label_relaxation_loss(logits, target, target.flip(0), torch.rand(6)).backward()
lr.linear_label_relaxation_loss(torch.randn(6, 3), torch.randn(5, 3), target)
print("eager loaded dynamo:", "torch._dynamo" in sys.modules)
compiled = torch.compile(lr.label_relaxation_loss, backend="aot_eager", fullgraph=True)
torch.testing.assert_close(compiled(logits, target), lr.label_relaxation_loss(logits, target))
from torch._dynamo.trace_rules import is_nonstrict_trace_callable
print("marked:", is_nonstrict_trace_callable(functional._compiled_loss))
"""


def test_import_and_eager_calls_leave_dynamo_unloaded_and_compile_still_marks() -> None:
    """``import torch._dynamo`` costs more than ``import torch``: only torch.compile loads it.

    Run in a fresh process, where nothing has loaded Dynamo: the eager losses must not, and once
    torch.compile has, the compiled path is marked ``nonstrict_trace`` as if decorated.
    """
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, "-c", IMPORT_WITHOUT_DYNAMO],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "eager loaded dynamo: False" in completed.stdout, completed.stdout
    assert "marked: True" in completed.stdout, completed.stdout


def test_compiled_path_is_marked_in_this_process() -> None:
    """Here Dynamo was loaded after or before the package: the mark is in place either way."""
    from torch._dynamo.trace_rules import is_nonstrict_trace_callable

    from label_relaxation import functional

    assert is_nonstrict_trace_callable(functional._compiled_loss)
