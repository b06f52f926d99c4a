"""The fused output layer + loss against a float64 reference that holds the full logits.

The reference computes the logits in float64, the projected KL divergence of each row
(``tests/reference.py``) and the gradient by the chain rule from ``p - q``: nothing of the
package. Float32 gradients are compared relative to the largest entry of each gradient (the
issue's criterion: a matrix product rounds at the scale of its largest terms).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from label_relaxation import (
    LinearLabelRelaxationLoss,
    label_relaxation_loss,
    linear_label_relaxation_loss,
)
from label_relaxation._impl import fused_linear as _linear
from label_relaxation._impl import linear_gradients as _gradients
from tests.reference import expected_gradient, projected_kl

H, V = 12, 40


@pytest.fixture(autouse=True, params=["packed", "unpacked"])
def packing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test with training rows packed (as on the CPU from H = 64) and not."""
    threshold = 0 if request.param == "packed" else 1 << 30
    monkeypatch.setattr(_gradients, "PACK_MIN_HIDDEN", threshold)
    return str(request.param)


def products_by_class_pieces(monkeypatch: pytest.MonkeyPatch, pieces: bool) -> None:
    """Forward products as ``(W·xᵀ)ᵀ`` in pieces of classes on this CPU, or as ``x·Wᵀ``."""
    capability = torch.backends.cpu.get_cpu_capability() if pieces else "none"
    monkeypatch.setattr(_linear, "CLASS_PIECES_CPU_CAPABILITIES", (capability,))


@pytest.fixture(autouse=True)
def class_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 16 classes, whatever this CPU: the 40 classes make two whole pieces and a part."""
    monkeypatch.setattr(_linear, "CPU_PIECE_CLASSES", 16)
    products_by_class_pieces(monkeypatch, True)


def reference(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    alpha: float | torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Float64 loss and the gradients of ``(grad_out · loss).sum()`` for x, w and b."""
    x64, w64 = x.detach().double().reshape(-1, x.shape[-1]), w.detach().double()
    b64 = None if b is None else b.detach().double()
    logits = x64 @ w64.T + (0 if b64 is None else b64)
    flat = target.reshape(-1)
    counted = flat != ignore_index
    safe = torch.where(counted, flat, 0)
    alpha64 = alpha if isinstance(alpha, float) else alpha.double().expand(target.shape).reshape(-1)
    class_weight = (
        torch.ones(w.shape[0], dtype=torch.float64) if weight is None else weight.double()
    )
    row_weight = torch.where(counted, class_weight[safe], 0.0)
    rows = projected_kl(logits, safe, alpha64) * row_weight
    rows_grad = (expected_gradient(logits, safe, alpha64) * row_weight[:, None]).reshape(
        -1, w.shape[0]
    )
    if reduction == "mean":
        denominator = row_weight.sum() if row_weight.sum() != 0 else torch.tensor(1.0)
        loss, rows_grad = rows.sum() / denominator, rows_grad / denominator
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.reshape(target.shape)
    scale = torch.ones(()) if grad_out is None else grad_out.double()
    grad_logits = rows_grad * (scale.reshape(-1, 1) if scale.dim() else scale)
    grad_x = (grad_logits @ w64).reshape(x.shape)
    grad_w = grad_logits.T @ x64
    grad_b = None if b is None else grad_logits.sum(0)
    return loss, grad_x, grad_w, grad_b


def assert_gradient_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().clamp_min(1e-30)
    error = (actual.double() - expected).abs().max()
    assert error <= rel * scale, f"error {error:.3g} > {rel:g} x {scale:.3g}"


def make_inputs(
    shape: tuple[int, ...], *, bias: bool = True, inside: float = 0.0, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Features, weight, bias and targets; a fraction ``inside`` of the rows in the credal set."""
    w = torch.randn(V, H, dtype=torch.float64) / H**0.5
    target = torch.randint(0, V, shape)
    x = torch.randn(*shape, H, dtype=torch.float64)
    flat_x, flat_t = x.view(-1, H), target.view(-1)
    inside_rows = torch.rand(flat_t.shape) < inside
    # A feature along the target's own weight row gives that class almost all the mass.
    flat_x[inside_rows] = (
        40 * w[flat_t[inside_rows]] / w[flat_t[inside_rows]].norm(dim=1, keepdim=True) ** 2
    )
    b = torch.randn(V, dtype=torch.float64) * 0.1 if bias else None
    cast = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    return cast[0], cast[1], cast[2], target  # type: ignore[return-value]


CASES = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "weight+ignore": {"weight": torch.rand(V) + 0.5, "ignore_index": 3},
    "weight+ignore,none": {"weight": torch.rand(V) + 0.5, "ignore_index": 3, "reduction": "none"},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("alpha_kind", ["float", "per_position"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(
    case: str, alpha_kind: str, chunk_size: int | None, bias: bool
) -> None:
    kwargs = CASES[case]
    x, w, b, target = make_inputs((3, 9), bias=bias, inside=0.4)
    target[0, :3] = 3  # the ignored class, where a case ignores it
    alpha = 0.1 if alpha_kind == "float" else torch.rand(3, 9) * 0.3 + 0.01
    loss = linear_label_relaxation_loss(
        x, w, target, alpha, linear_bias=b, chunk_size=chunk_size, **kwargs
    )
    # Different incoming gradients per row: the trap of scaling after the weight product.
    grad_out = torch.rand(3, 9) + 0.5 if kwargs.get("reduction") == "none" else torch.tensor(1.7)
    params = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(loss, params, grad_out)
    ref_loss, *ref_grads = reference(x, w, b, target, alpha, grad_out=grad_out, **kwargs)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for actual, expected in zip(grads, [g for g in ref_grads if g is not None], strict=True):
        assert_gradient_close(actual, expected, 1e-5)


def test_rows_inside_the_set_get_exact_zeros_and_are_counted() -> None:
    x, w, b, target = make_inputs((64,), inside=0.5)
    loss, fraction = linear_label_relaxation_loss(
        x, w, target, 0.1, linear_bias=b, chunk_size=16, return_training_fraction=True
    )
    loss.backward()
    rows = projected_kl(F.linear(x.double(), w.double(), b.double()), target, 0.1)
    inside = rows == 0
    assert 10 < int(inside.sum()) < 54
    assert x.grad is not None
    assert torch.equal(x.grad[inside], torch.zeros_like(x.grad[inside]))
    assert (x.grad[~inside].abs().sum(-1) > 0).all()
    assert fraction.item() == pytest.approx(float((~inside).float().mean()), abs=0)
    _, ref_x, ref_w, ref_b = reference(x, w, b, target, 0.1)
    assert_gradient_close(x.grad, ref_x, 1e-5)
    assert w.grad is not None and b is not None and b.grad is not None
    assert_gradient_close(w.grad, ref_w, 1e-5)
    assert_gradient_close(b.grad, ref_b, 1e-5)  # type: ignore[arg-type]


class ProductOutputs(TorchDispatchMode):
    """Records each forward product (a ``mm``/``addmm`` over the H features): where it wrote and
    its rows of logits.

    ``None`` stands for a product into fresh memory (no ``out=``). The gradient products
    contract over the classes or the rows, not the features. A product in pieces of classes,
    ``W_piece·xᵀ``, has the block's rows as its columns, ``x·Wᵀ`` all ``classes`` as its columns.
    """

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.features, self.classes = features, classes
        self.storages: list[int | None] = []
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm):
            left = args[0] if packet is torch.ops.aten.mm else args[1]
            if left.shape[-1] == self.features:
                into_buffer = func in (torch.ops.aten.mm.out, torch.ops.aten.addmm.out)
                storage = result.untyped_storage().data_ptr()
                self.storages.append(storage if into_buffer else None)
                whole = result.shape[-1] == self.classes
                self.rows.append(int(result.shape[0] if whole else result.shape[1]))
        return result


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_training_rows_of_several_blocks_are_multiplied_out_together(
    packing: str, reduction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A product of a few rows costs nearly what one of many does: with most rows inside the
    # credal set, the training rows of several blocks wait for one weight-gradient product.
    monkeypatch.setattr(_gradients, "WEIGHT_PIECES_CPU_CAPABILITIES", ())
    torch.manual_seed(5)
    x, w, b, target = make_inputs((96,), inside=0.75)
    with ProductOutputs(H, V) as forward, CountedProducts() as products:
        loss = linear_label_relaxation_loss(
            x, w, target, 0.1, linear_bias=b, chunk_size=16, reduction=reduction
        )
        loss.sum().backward()
    logits = F.linear(x.double(), w.double(), b.double())  # type: ignore[union-attr]
    training = int((projected_kl(logits, target, 0.1) > 0).sum())
    assert 6 < training < 48
    passes = 2 if reduction == "none" else 1  # the forward pass, then the backward pass's
    block_rows = forward.rows[::3]  # the 40 classes in 3 pieces per block
    assert forward.rows == [rows for rows in block_rows for _ in range(3)]
    assert sum(block_rows) == passes * 96
    assert max(block_rows) <= 16
    if packing == "packed":
        # Only training rows, each product but the last more than half a block's worth; the
        # blocks after a wait are shorter: the waiting rows and the next block share the buffer.
        assert sum(products.rows) == training
        assert all(rows > 8 for rows in products.rows[:-1])
        assert len(products.rows) < training / 8 + 1
        assert min(block_rows) < 16
    else:
        assert products.rows == [16] * 6
        assert block_rows == [16] * (passes * 6)
    _, ref_x, ref_w, ref_b = reference(x, w, b, target, 0.1, reduction=reduction)
    assert x.grad is not None and w.grad is not None and b is not None
    assert_gradient_close(x.grad, ref_x, 1e-5)
    assert_gradient_close(w.grad, ref_w, 1e-5)
    assert_gradient_close(b.grad, ref_b, 1e-5)  # type: ignore[arg-type]


class CountedProducts(TorchDispatchMode):
    """Counts the weight-gradient products (``addmm_``) and the rows each one takes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.addmm_.default:
            self.rows.append(int(args[2].shape[0]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("on_this_cpu", [True, False])
def test_weight_gradient_of_a_packed_block_runs_in_pieces(
    packing: str, reduction: str, on_this_cpu: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pieces only on the CPUs where they were measured faster (AVX-512).
    monkeypatch.setattr(_gradients, "WEIGHT_PIECES_MIN_HIDDEN", H)
    capability = torch.backends.cpu.get_cpu_capability() if on_this_cpu else "none"
    monkeypatch.setattr(_gradients, "WEIGHT_PIECES_CPU_CAPABILITIES", (capability,))
    torch.manual_seed(3)
    x, w, b, target = make_inputs((96,), inside=0.3)
    with CountedProducts() as products:
        loss = linear_label_relaxation_loss(
            x, w, target, 0.1, linear_bias=b, chunk_size=96, reduction=reduction
        )
        loss.sum().backward()
    logits = F.linear(x.double(), w.double(), b.double())  # type: ignore[union-attr]
    training = int((projected_kl(logits, target, 0.1) > 0).sum())
    assert _gradients.WEIGHT_PIECE_ROWS < training < _gradients.WEIGHT_ONE_PRODUCT_ROWS
    if packing == "packed" and not on_this_cpu:
        assert products.rows == [training]
    elif packing == "packed":
        # Only the training rows, in equal pieces of at most WEIGHT_PIECE_ROWS rows.
        assert sum(products.rows) == training
        assert len(products.rows) == -(-training // _gradients.WEIGHT_PIECE_ROWS)
        assert max(products.rows) - min(products.rows) <= 1
    else:
        assert products.rows == [96]
    _, ref_x, ref_w, ref_b = reference(x, w, b, target, 0.1, reduction=reduction)
    assert x.grad is not None and w.grad is not None and b is not None
    assert_gradient_close(x.grad, ref_x, 1e-5)
    assert_gradient_close(w.grad, ref_w, 1e-5)
    assert_gradient_close(b.grad, ref_b, 1e-5)  # type: ignore[arg-type]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pieces", [True, False])
def test_every_block_of_logits_reuses_one_buffer(
    bias: bool, dtype: torch.dtype, pieces: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fresh memory for every block costs its page faults each time (docs/language-models.md).
    products_by_class_pieces(monkeypatch, pieces)
    x, w, b, target = make_inputs((23,), bias=bias, dtype=dtype)
    with ProductOutputs(H, V) as outputs:
        loss = linear_label_relaxation_loss(x, w, target, 0.1, linear_bias=b, chunk_size=5)
    # 23 rows in blocks of 5, the 40 classes in 3 pieces or at once
    assert len(outputs.storages) == 5 * (3 if pieces else 1)
    assert outputs.rows[:: 3 if pieces else 1] == [5, 5, 5, 5, 3]
    assert None not in outputs.storages
    assert len(set(outputs.storages)) == 1
    if dtype == torch.bfloat16:
        return  # its accuracy against the unfused computation is tested below
    loss.backward()
    _, ref_x, ref_w, _ = reference(x, w, b, target, 0.1)
    assert x.grad is not None and w.grad is not None
    assert_gradient_close(x.grad, ref_x, 1e-5)
    assert_gradient_close(w.grad, ref_w, 1e-5)


def test_training_fraction_counts_only_counted_positions() -> None:
    x, w, _, target = make_inputs((20,), bias=False)
    target[:5] = -100
    with torch.no_grad():
        _, fraction = linear_label_relaxation_loss(x, w, target, return_training_fraction=True)
    assert fraction.item() == 1.0
    assert fraction.dtype == torch.float32


def test_all_ignored_batch_gives_zero_loss_and_gradient() -> None:
    x, w, b, _ = make_inputs((6,))
    target = torch.full((6,), -100)
    loss = linear_label_relaxation_loss(x, w, target, linear_bias=b)
    loss.backward()
    assert loss.item() == 0.0
    assert x.grad is not None and w.grad is not None
    assert not x.grad.any() and not w.grad.any()


def test_equals_the_unfused_loss_with_a_tied_embedding() -> None:
    embedding = torch.nn.Embedding(V, H)
    tokens = torch.randint(0, V, (4, 6))
    target = torch.randint(0, V, (4, 6))

    def step(fused: bool) -> torch.Tensor:
        embedding.zero_grad()
        hidden = torch.tanh(embedding(tokens))
        if fused:
            loss = linear_label_relaxation_loss(hidden, embedding.weight, target, 0.2)
        else:
            loss = label_relaxation_loss(F.linear(hidden, embedding.weight), target, 0.2)
        loss.backward()
        assert embedding.weight.grad is not None
        return embedding.weight.grad.clone()

    torch.testing.assert_close(step(True), step(False), rtol=1e-5, atol=1e-6)


class LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_holds_more_than_one_block_of_logits(reduction: str) -> None:
    tokens, vocab, hidden, block = 512, 1000, 8, 16
    x = torch.randn(tokens, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,))
    with LargestAllocation() as mode:
        loss = linear_label_relaxation_loss(x, w, target, reduction=reduction, chunk_size=block)
        loss.sum().backward()
    # The largest tensors are the block's logits and the weight's gradient, never tokens x vocab.
    assert mode.largest == max(block * vocab, vocab * hidden)


@pytest.mark.parametrize("chunk_size", [None, 7])  # one block; blocks sharing the buffers
def test_half_precision_is_no_less_accurate_than_unfused(chunk_size: int | None) -> None:
    torch.manual_seed(1)
    x, w, b, target = make_inputs((256,), dtype=torch.bfloat16)
    loss = linear_label_relaxation_loss(x, w, target, 0.1, linear_bias=b, chunk_size=chunk_size)
    fused = torch.autograd.grad(loss, (x, w, b))
    unfused_loss = label_relaxation_loss(F.linear(x, w, b), target, 0.1)
    unfused = torch.autograd.grad(unfused_loss, (x, w, b))
    ref_loss, *ref = reference(x, w, b, target, 0.1)
    assert loss.dtype == torch.float32
    assert abs(loss.double() - ref_loss) <= abs(unfused_loss.double() - ref_loss) * 1.01 + 1e-7
    for ours, theirs, expected in zip(fused, unfused, ref, strict=True):
        assert expected is not None
        our_error = (ours.double() - expected).abs().max()
        their_error = (theirs.double() - expected).abs().max()
        assert our_error <= their_error * 1.01, (our_error, their_error)


def test_module_matches_function_and_owns_its_layer() -> None:
    criterion = LinearLabelRelaxationLoss(H, V, alpha=0.2, bias=True, chunk_size=5)
    assert isinstance(criterion.linear, torch.nn.Linear)
    assert criterion.linear.weight.shape == (V, H)
    x = torch.randn(2, 7, H)
    target = torch.randint(0, V, (2, 7))
    loss = criterion(x, target)
    expected = linear_label_relaxation_loss(
        x, criterion.linear.weight, target, 0.2, linear_bias=criterion.linear.bias
    )
    torch.testing.assert_close(loss, expected)
    criterion.alpha = 0.05
    assert criterion.alpha_buffer.item() == 0.05
    assert set(criterion.state_dict()) == {"linear.weight", "linear.bias"}


def test_torch_func_transforms_use_the_unfused_loss() -> None:
    x, w, b, target = make_inputs((5,))
    assert b is not None

    def loss_of(features: torch.Tensor) -> torch.Tensor:
        return linear_label_relaxation_loss(
            features, w.detach(), target, 0.1, linear_bias=b.detach()
        )

    grad = torch.func.grad(loss_of)(x.detach())
    _, ref_x, _, _ = reference(x, w, b, target, 0.1)
    assert_gradient_close(grad, ref_x, 1e-5)
    rows = torch.func.vmap(
        lambda features, y: linear_label_relaxation_loss(features, w.detach(), y, 0.1)
    )(x.detach()[:, None], target[:, None])
    ref_rows = projected_kl(F.linear(x.double(), w.double()), target, 0.1)
    torch.testing.assert_close(rows.squeeze(-1).double(), ref_rows, rtol=1e-5, atol=1e-6)


def test_double_backward_names_the_alternative() -> None:
    x, w, _, target = make_inputs((4,), bias=False)
    loss = linear_label_relaxation_loss(x, w, target)
    with pytest.raises(RuntimeError, match="implementation='reference'"):
        torch.autograd.grad(loss, x, create_graph=True)


BAD = [
    (
        {"w": torch.randn(V, H + 1)},
        ValueError,
        r"linear_weight must have shape \(V, H\) with H = input.shape\[-1\] = 12",
    ),
    (
        {"w": torch.randn(V, H, dtype=torch.float64)},
        TypeError,
        "linear_weight must have the input's dtype",
    ),
    ({"b": torch.randn(V + 1)}, ValueError, r"linear_bias must have shape \(V,\) = \(40,\)"),
    (
        {"target": torch.randint(0, V, (5,))},
        ValueError,
        r"target must have shape input.shape\[:-1\] = \(4,\)",
    ),
    ({"target": torch.rand(4)}, TypeError, "target must hold integer class indices"),
    ({"target": torch.tensor([0, 1, 40, 2])}, IndexError, r"Target 40 is out of bounds"),
    ({"alpha": 1.5}, ValueError, r"alpha must lie in the open interval \(0, 1\)"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int or None, got 0"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"x": torch.randint(0, 3, (4, H))}, TypeError, "input must be a floating tensor"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD)
def test_bad_input_raises_a_clear_error(change: dict, error: type, message: str) -> None:  # type: ignore[type-arg]
    arguments = {
        "x": torch.randn(4, H),
        "w": torch.randn(V, H),
        "target": torch.randint(0, V, (4,)),
        "alpha": 0.1,
        "b": None,
        "chunk_size": None,
        "reduction": "mean",
    }
    arguments.update(change)
    with pytest.raises(error, match=message):
        linear_label_relaxation_loss(
            arguments["x"],
            arguments["w"],
            arguments["target"],
            arguments["alpha"],
            linear_bias=arguments["b"],
            chunk_size=arguments["chunk_size"],
            reduction=arguments["reduction"],
        )


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("alpha_kind", ["float", "per_position"])
def test_fullgraph_compile_matches_eager(reduction: str, alpha_kind: str) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    x, w, b, target = make_inputs((2, 9), inside=0.3)
    target[0, 0] = -100
    alpha = 0.1 if alpha_kind == "float" else torch.rand(2, 9) * 0.3 + 0.01

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_label_relaxation_loss(
            x,
            w,
            target,
            alpha,
            linear_bias=b,
            reduction=reduction,
            chunk_size=4,
            return_training_fraction=True,
        )

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    grad_out = torch.rand(2, 9) if reduction == "none" else torch.tensor(1.0)
    results = []
    for function in (compiled, fn):
        loss, fraction = function(x, w, b)
        grads = torch.autograd.grad(loss, (x, w, b), grad_out)
        results.append((loss.detach(), fraction, *grads))
    assert counter.frame_count == 1
    for compiled_value, eager_value in zip(*results, strict=True):
        torch.testing.assert_close(compiled_value, eager_value, rtol=1e-6, atol=1e-7)


def test_compiled_module_does_not_recompile_for_an_alpha_schedule() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    criterion = LinearLabelRelaxationLoss(H, V, alpha=0.3)
    x = torch.randn(8, H)
    target = torch.randint(0, V, (8,))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(criterion, fullgraph=True, backend=counter)
    for alpha in (0.3, 0.2, 0.1, 0.05):
        criterion.alpha = alpha
        loss = compiled(x, target)
        expected = linear_label_relaxation_loss(x, criterion.linear.weight, target, alpha)
        torch.testing.assert_close(loss, expected)
    assert counter.frame_count == 1


@pytest.mark.inductor
def test_inductor_compiles_a_model_ending_in_the_loss() -> None:
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Tanh())
    criterion = LinearLabelRelaxationLoss(H, V, alpha=0.1, bias=True, chunk_size=8)
    x = torch.randn(3, 10, H)
    target = torch.randint(0, V, (3, 10))

    def step(features: torch.Tensor) -> torch.Tensor:
        return criterion(model(features), target)

    compiled = torch.compile(step, fullgraph=True)
    parameters = [*model.parameters(), *criterion.parameters()]
    compiled_grads = torch.autograd.grad(compiled(x), parameters)
    eager_grads = torch.autograd.grad(step(x), parameters)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)
