"""Output layer and loss fused: the logits exist one block of rows at a time.

For each block of rows the forward pass computes the block's logits ``x·Wᵀ + b``, the block's
loss rows and its gradient ``w·(p - q)`` (in place, in the block's logits buffer), and hands the
gradient to :mod:`label_relaxation._impl.linear_gradients`, which adds it to the three gradients
(``∂x = G·W``, ``∂W += Gᵀ·x``, ``∂b += Σ G``) without the rows inside the credal set, whose
gradient is exactly zero. The backward pass only scales those by the incoming gradient.

``reduction="none"`` cannot finish the gradients in the forward pass (each row's incoming
gradient must scale it before it enters ``∂W``), so its forward pass keeps only the loss rows
and its backward pass computes the logits a second time, block by block.

The per-block arithmetic is the cache-chunked in-place kernel of
:mod:`label_relaxation._impl.fused`; with the weight split along the classes across ranks, the
in-place kernel of :mod:`label_relaxation._impl.vocab_parallel`, whose row statistics are
all-reduced. Under ``torch.compile`` the block loop runs as ``torch.library`` operators defined
below: the graph compiles whole (``fullgraph=True``), its compile time does not grow with the
number of blocks, and it never holds more than one block's logits either.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from label_relaxation._impl.closed_form import AlphaLike
from label_relaxation._impl.fused import compute_dtype, fused_rows
from label_relaxation._impl.linear_gradients import Gradients, PendingRows

# CPU: 20 MiB of float32 logits per block, 1.25x the 16 MiB blocks of PyTorch's chunked
# linear_cross_entropy. The products then have about 160 rows for a 32k vocabulary, where the
# CPU's GEMM reaches most of its speed. At (4096, 1024, 32000), against 16 MiB blocks (131 rows),
# both with the weight-gradient pieces of linear_gradients (AVX-512 Xeon, alternating processes,
# medians of 3, three rounds): 0.95-0.98x the time with every row outside and with 75% inside,
# 0.97-1.02x at 50%.
CPU_BLOCK_ELEMENTS = 5 << 20
# ... but never fewer rows than this: each product of a block reads the whole (V, H) weight or
# its gradient, so blocks of a few rows make that reading the cost. At (2048, 1024, 128256)
# 5·2^20 logits are 40 rows: PyTorch's chunked loss, with 32-row blocks there, took 1.56-1.65x
# the unfused time; the fused loss with 128-row blocks 0.99-1.08x (docs/language-models.md).
CPU_MIN_BLOCK_ROWS = 128
# On AVX2 CPUs a block's logits are computed as (W·xᵀ)ᵀ, this many classes at a time (a piece
# of P x R floats, 640 KiB for 160 rows, stays in the L2 cache while it is copied out
# transposed). On a 2-core AMD EPYC (AVX2) MKL's product x·Wᵀ of a few hundred rows was slow:
# at (4000, 1024, 32000) in 160-row blocks the forward products took 4.2-4.7 s that way against
# 2.8-3.0 s in 1024-class pieces (one 4000-row product: 2.6-3.3 s; pieces of 4096 and 8000
# classes 3.3-3.4 s; bfloat16 16.0 against 17.5 s, the conversion to float32 included); the
# whole fused loss took 0.85x and, at (2048, 1024, 128256), 0.73x the time. The AVX-512 Xeon
# where this module's other CPU figures were measured keeps x·Wᵀ, measured there.
CPU_PIECE_CLASSES = 1024
CLASS_PIECES_CPU_CAPABILITIES = ("AVX2",)
# Other devices (not measured: no GPU was available): 256 MiB of float32 per block, so that
# each product is large and the launches of the per-block operations are few.
DEVICE_BLOCK_ELEMENTS = 1 << 26


def default_block_rows(num_classes: int, device: torch.device) -> int:
    """Rows per block when the caller gives no ``chunk_size``: a logits budget, rows bounded."""
    if device.type == "cpu":
        return max(CPU_MIN_BLOCK_ROWS, CPU_BLOCK_ELEMENTS // num_classes)
    return max(1, DEVICE_BLOCK_ELEMENTS // num_classes)


class LinearProblem(NamedTuple):
    """The flattened inputs of one call."""

    input: Tensor  # (N, H)
    weight: Tensor  # (V, H)
    bias: Tensor | None  # (V,)
    target: Tensor  # (N,) int64, valid class indices
    alpha: AlphaLike  # float, or (N,) in the compute dtype
    row_weight: Tensor  # (N,) compute dtype, divided by the mean's denominator
    # Vocabulary parallelism: `weight` holds classes [vocab_start, vocab_start + V_local) of the
    # group named `group_name` ("": not split).
    vocab_start: int = 0
    group_name: str = ""

    def block_logits(self, rows: slice, buffers: BlockBuffers, offset: int) -> Tensor:
        """Logits of ``rows`` in the compute dtype, written into ``buffers`` from row ``offset``.

        Half-precision products are computed in their dtype, as ``F.linear`` does, then copied
        to float32.
        """
        block_input = self.input[rows]
        place = slice(offset, offset + block_input.shape[0])
        if buffers.piece is not None:
            logits = buffers.logits[place]
            self._logits_by_class_pieces(block_input, logits, buffers.piece)
            return logits
        product = buffers.product[place]
        if self.bias is None:
            torch.mm(block_input, self.weight.t(), out=product)
        else:
            torch.addmm(self.bias, block_input, self.weight.t(), out=product)
        return product if buffers.compute is None else buffers.compute[place].copy_(product)

    def _logits_by_class_pieces(self, block_input: Tensor, logits: Tensor, piece: Tensor) -> None:
        """``logits = block_input·Wᵀ + b`` as ``(W·block_inputᵀ)ᵀ``, a piece of classes at a time.

        See ``CPU_PIECE_CLASSES``. ``piece`` ``(P, R)`` has the input's dtype; the copy out of
        it converts half-precision products to the compute dtype on the way.
        """
        input_t = block_input.t()
        num_classes = self.weight.shape[0]
        for first in range(0, num_classes, piece.shape[0]):
            classes = slice(first, min(first + piece.shape[0], num_classes))
            out = piece[: classes.stop - first, : block_input.shape[0]]
            weight = self.weight[classes]
            if self.bias is None:
                torch.mm(weight, input_t, out=out)
            else:
                torch.addmm(self.bias[classes].unsqueeze(-1), weight, input_t, out=out)
            logits[:, classes].copy_(out.t())

    def block_alpha(self, rows: slice) -> AlphaLike:
        """Alpha of ``rows``."""
        return self.alpha[rows] if isinstance(self.alpha, Tensor) else self.alpha


def _block(
    problem: LinearProblem,
    rows: slice,
    row_weight: Tensor,
    pending: PendingRows | None,
    buffers: BlockBuffers,
) -> tuple[Tensor, Tensor]:
    """Loss rows of one block and its training rows; hand the block's gradient to ``pending``."""
    offset = 0 if pending is None else pending.waiting
    logits = problem.block_logits(rows, buffers, offset)
    target, alpha = problem.target[rows], problem.block_alpha(rows)
    if problem.group_name:
        loss, trains = _sharded_block(problem, logits, target, alpha, row_weight)
    elif pending is None:
        loss = fused_rows(logits, target, alpha, row_weight, None)
        return loss, loss != 0
    else:
        trains = torch.empty(logits.shape[0], dtype=torch.bool, device=logits.device)
        # The gradient overwrites the block's logits, so a block needs one buffer, not two.
        loss = fused_rows(logits, target, alpha, row_weight, logits, trains)
    if pending is not None:
        pending.add(logits, trains, rows.start)
    return loss, trains


def _sharded_block(
    problem: LinearProblem, logits: Tensor, target: Tensor, alpha: AlphaLike, row_weight: Tensor
) -> tuple[Tensor, Tensor]:
    """Loss and training rows of a block of a weight split along the classes, in place."""
    # Imported here: torch.distributed is not needed (nor always built) elsewhere.
    from label_relaxation._impl.vocab_parallel import eager_vocab_parallel

    local_target = target - problem.vocab_start
    held = (local_target >= 0) & (local_target < logits.shape[-1])
    local_target = torch.where(held, local_target, -1)
    # The row statistics are all-reduced; the gradient overwrites the block's logits.
    coefficients = eager_vocab_parallel(
        logits, local_target, held, alpha, row_weight, problem.group_name, logits
    )
    trains = (coefficients.off_target != 0) | (coefficients.on_target != 0)
    return coefficients.loss, trains


class BlockBuffers(NamedTuple):
    """The logits memory that every block of one call reuses.

    Fresh memory costs its page faults on every block: at (4096, 1024, 32000) the forward
    product of a 163-row block took 42 ms into fresh memory against 36 ms into reused memory
    (float32, with ``THP_MEM_ALLOC_ENABLE=1``), and the whole forward+backward 1-5% less time.
    """

    product: Tensor  # (R, V) in the input's dtype
    compute: Tensor | None  # (R, V) float32 copy of half-precision products, else None
    piece: Tensor | None  # (P, R) in the input's dtype: the CPU's product pieces, else None

    @property
    def logits(self) -> Tensor:
        """The buffer that holds the logits, then the gradient, in the compute dtype."""
        return self.product if self.compute is None else self.compute

    @staticmethod
    def allocate(problem: LinearProblem, rows: int) -> BlockBuffers:
        """Buffers for blocks of up to ``rows`` rows of ``problem``."""
        weight = problem.weight
        product = weight.new_empty(rows, weight.shape[0])
        dtype = compute_dtype(weight.dtype)
        compute = None if dtype == weight.dtype else product.new_empty(product.shape, dtype=dtype)
        piece = None
        capability = torch.backends.cpu.get_cpu_capability()
        if weight.is_cpu and capability in CLASS_PIECES_CPU_CAPABILITIES:
            piece = weight.new_empty(min(CPU_PIECE_CLASSES, weight.shape[0]), rows)
        return BlockBuffers(product, compute, piece)


def run_blocks(
    problem: LinearProblem,
    block_rows: int,
    grads: Gradients | None,
    row_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Walk the rows block by block: loss rows ``(N,)`` and how many rows train (0-d).

    A row trains when its gradient may be nonzero (counted and outside the credal set); the
    eager forward-only pass, which computes no gradient, counts the rows with a nonzero loss.

    ``row_scale`` ``(N,)`` multiplies each row's weight (the incoming gradients of
    ``reduction="none"``); it changes the gradients, not the returned loss rows' meaning.
    """
    rows_total = problem.input.shape[0]
    row_weight = problem.row_weight if row_scale is None else problem.row_weight * row_scale
    losses, trains = [row_weight.new_zeros(0)], [row_weight.new_zeros(0, dtype=torch.bool)]
    buffers = BlockBuffers.allocate(problem, min(block_rows, rows_total))
    pending = None
    if grads is not None:
        # Sharded weights: every rank must cut the same blocks (their row statistics are
        # all-reduced), so no rows wait for the next block's.
        pending = PendingRows(grads, problem, buffers, wait=not problem.group_name)
    start = 0
    while start < rows_total:
        free = buffers.product.shape[0] - (0 if pending is None else pending.waiting)
        rows = slice(start, min(start + free, rows_total))
        block_loss, block_trains = _block(problem, rows, row_weight[rows], pending, buffers)
        losses.append(block_loss)
        trains.append(block_trains)
        start = rows.stop
    if pending is not None:
        pending.flush()
    if problem.group_name and grads is not None and grads.input is not None:
        import torch.distributed._functional_collectives as funcol

        # The input is replicated: its gradient is the sum of every rank's classes' share.
        group: Any = problem.group_name
        grads.input.copy_(funcol.all_reduce(grads.input, "sum", group))
    return torch.cat(losses), torch.cat(trains).sum()


def _empty_if_none(tensor: Tensor | None, like: Tensor) -> Tensor:
    """Operators return tensors only: an empty one stands for "no gradient"."""
    return like.new_empty(0) if tensor is None else tensor


def _none_if_empty(tensor: Tensor) -> Tensor | None:
    return None if tensor.numel() == 0 else tensor


def _as_operator_outputs(grads: Gradients, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (
        _empty_if_none(grads.input, input),
        _empty_if_none(grads.weight, input),
        _empty_if_none(grads.bias, input),
    )


def _fake_gradients(
    wanted: list[bool], input: Tensor, weight: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Shapes of the gradient outputs for the compiler: empty where not wanted."""
    fake = Gradients(
        torch.empty_like(input) if wanted[0] else None,
        torch.empty_like(weight) if wanted[1] else None,
        torch.empty_like(bias) if wanted[2] and bias.numel() > 0 else None,
    )
    return _as_operator_outputs(fake, input)


def _forward_gradients(
    problem: LinearProblem, block_rows: int, wanted: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor, Gradients]:
    """Summed loss, training rows and finished gradients of a reduced loss, in one pass."""
    grads = Gradients.allocate(problem, wanted)
    loss_rows, training = run_blocks(problem, block_rows, grads)
    return loss_rows.sum(), training, grads.finished(problem)


def _backward_gradients(
    problem: LinearProblem, block_rows: int, wanted: tuple[bool, bool, bool], grad_rows: Tensor
) -> Gradients:
    """Gradients of ``Σ grad_rows·loss_rows``: the logits computed again, block by block."""
    grads = Gradients.allocate(problem, wanted)
    run_blocks(problem, block_rows, grads, grad_rows.to(problem.row_weight.dtype))
    return grads.finished(problem)


# Under torch.compile the kernel is one operator of the graph: the graph compiles whole
# (fullgraph=True) and its compile time does not grow with the number of blocks, as it would if
# the block loop were unrolled into it. Inductor compiles the model around the operator.
# Operators take tensors and scalars only: a Python-float alpha travels as `alpha_value` with an
# empty `alpha`, and an absent bias as an empty tensor.


def _problem(
    input: Tensor,
    weight: Tensor,
    bias: Tensor,
    target: Tensor,
    alpha: Tensor,
    alpha_value: float,
    row_weight: Tensor,
    vocab_start: int,
    group_name: str,
) -> LinearProblem:
    alpha_like: AlphaLike = alpha if alpha.numel() > 0 else alpha_value
    bias_or_none = _none_if_empty(bias)
    return LinearProblem(
        input, weight, bias_or_none, target, alpha_like, row_weight, vocab_start, group_name
    )


@torch.library.custom_op("label_relaxation::linear_relaxation_forward", mutates_args=())
def _forward_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor,
    target: Tensor,
    alpha: Tensor,
    alpha_value: float,
    row_weight: Tensor,
    vocab_start: int,
    group_name: str,
    block_rows: int,
    wanted: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Summed loss, training rows and the three gradients (empty where not wanted)."""
    problem = _problem(
        input, weight, bias, target, alpha, alpha_value, row_weight, vocab_start, group_name
    )
    loss, training, grads = _forward_gradients(
        problem, block_rows, (wanted[0], wanted[1], wanted[2])
    )
    return (loss, training, *_as_operator_outputs(grads, input))


@_forward_op.register_fake
def _(
    input: Tensor,
    weight: Tensor,
    bias: Tensor,
    target: Tensor,
    alpha: Tensor,
    alpha_value: float,
    row_weight: Tensor,
    vocab_start: int,
    group_name: str,
    block_rows: int,
    wanted: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss = row_weight.new_empty(())
    training = target.new_empty((), dtype=torch.int64)
    return (loss, training, *_fake_gradients(wanted, input, weight, bias))


@torch.library.custom_op("label_relaxation::linear_relaxation_rows", mutates_args=())
def _rows_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor,
    target: Tensor,
    alpha: Tensor,
    alpha_value: float,
    row_weight: Tensor,
    vocab_start: int,
    group_name: str,
    block_rows: int,
) -> tuple[Tensor, Tensor]:
    """Loss rows and training rows, forward only."""
    problem = _problem(
        input, weight, bias, target, alpha, alpha_value, row_weight, vocab_start, group_name
    )
    return run_blocks(problem, block_rows, None)


@_rows_op.register_fake
def _(
    input: Tensor,
    weight: Tensor,
    bias: Tensor,
    target: Tensor,
    alpha: Tensor,
    alpha_value: float,
    row_weight: Tensor,
    vocab_start: int,
    group_name: str,
    block_rows: int,
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(row_weight), target.new_empty((), dtype=torch.int64)


@torch.library.custom_op("label_relaxation::linear_relaxation_backward", mutates_args=())
def _backward_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor,
    target: Tensor,
    alpha: Tensor,
    alpha_value: float,
    row_weight: Tensor,
    vocab_start: int,
    group_name: str,
    block_rows: int,
    wanted: list[bool],
    grad_rows: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The three gradients of ``Σ grad_rows·loss_rows`` (empty where not wanted)."""
    problem = _problem(
        input, weight, bias, target, alpha, alpha_value, row_weight, vocab_start, group_name
    )
    want = (wanted[0], wanted[1], wanted[2])
    grads = _backward_gradients(problem, block_rows, want, grad_rows)
    return _as_operator_outputs(grads, input)


@_backward_op.register_fake
def _(
    input: Tensor,
    weight: Tensor,
    bias: Tensor,
    target: Tensor,
    alpha: Tensor,
    alpha_value: float,
    row_weight: Tensor,
    vocab_start: int,
    group_name: str,
    block_rows: int,
    wanted: list[bool],
    grad_rows: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return _fake_gradients(wanted, input, weight, bias)


_DOUBLE_BACKWARD = (
    "label_relaxation: linear_label_relaxation_loss computes its gradients in the forward "
    "pass and supports first-order reverse mode only. For double backward (create_graph=True), "
    "use label_relaxation_loss(F.linear(input, linear_weight, linear_bias), target, ..., "
    "implementation='reference'), which holds the full logits."
)


def _operator_arguments(problem: LinearProblem) -> tuple[Any, ...]:
    """``problem`` in the operators' argument form."""
    alpha, bias = problem.alpha, problem.bias
    alpha_tensor = alpha if isinstance(alpha, Tensor) else problem.row_weight.new_empty(0)
    alpha_value = 0.0 if isinstance(alpha, Tensor) else float(alpha)
    bias_tensor = problem.input.new_empty(0) if bias is None else bias
    return (
        problem.input,
        problem.weight,
        bias_tensor,
        problem.target,
        alpha_tensor,
        alpha_value,
        problem.row_weight,
        problem.vocab_start,
        problem.group_name,
    )


class LinearLoss(torch.autograd.Function):
    """Autograd node of the fused linear loss.

    Reduced losses get their three gradients in the forward pass; ``reduction="none"`` saves
    the inputs and computes them in the backward pass, scaled row by row. In eager mode the
    kernel runs directly, under ``torch.compile`` as the operators above.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        alpha: AlphaLike,
        row_weight: Tensor,
        vocab_start: int,
        group_name: str,
        block_rows: int,
        reduce: bool,
    ) -> tuple[Tensor, Tensor]:
        """Return the loss (summed when ``reduce``) and the number of training rows."""
        problem = LinearProblem(
            input, weight, bias, target, alpha, row_weight, vocab_start, group_name
        )
        wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        ctx.block_rows, ctx.reduce, ctx.wanted = block_rows, reduce, wanted
        ctx.set_materialize_grads(False)
        compiling = torch.compiler.is_compiling()
        if reduce:
            if compiling:
                loss, training, *op_grads = _forward_op(
                    *_operator_arguments(problem), block_rows, list(wanted)
                )
                grads = Gradients(*(_none_if_empty(g) for g in op_grads))
            else:
                loss, training, grads = _forward_gradients(problem, block_rows, wanted)
            ctx.save_for_backward(*grads)
        else:
            if compiling:
                loss, training = _rows_op(*_operator_arguments(problem), block_rows)
            else:
                loss, training = run_blocks(problem, block_rows, None)
            ctx.alpha = None if isinstance(alpha, Tensor) else alpha
            ctx.vocab_start, ctx.group_name = vocab_start, group_name
            alpha_tensor = alpha if isinstance(alpha, Tensor) else None
            ctx.save_for_backward(input, weight, bias, target, alpha_tensor, row_weight)
        ctx.mark_non_differentiable(training)
        return loss, training

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, _: Tensor | None) -> tuple[Tensor | None, ...]:
        """Scale the stored gradients, or (no reduction) compute them with row scales."""
        none = (None,) * 7
        if grad_loss is None:
            return (None, None, None, *none)
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        if ctx.reduce:
            saved = ctx.saved_tensors
            # loss.backward() passes exactly 1; on the CPU reading it is a plain memory read.
            on_cpu = grad_loss.device.type == "cpu" and not torch.compiler.is_compiling()
            if on_cpu and grad_loss.item() == 1.0:
                return (*saved, *none)
            return (*(None if g is None else g * grad_loss.to(g.dtype) for g in saved), *none)
        input, weight, bias, target, alpha_tensor, row_weight = ctx.saved_tensors
        alpha = ctx.alpha if alpha_tensor is None else alpha_tensor
        problem = LinearProblem(
            input, weight, bias, target, alpha, row_weight, ctx.vocab_start, ctx.group_name
        )
        if torch.compiler.is_compiling():
            op_grads = _backward_op(
                *_operator_arguments(problem), ctx.block_rows, list(ctx.wanted), grad_loss
            )
            return (*(_none_if_empty(g) for g in op_grads), *none)
        return (*_backward_gradients(problem, ctx.block_rows, ctx.wanted, grad_loss), *none)
