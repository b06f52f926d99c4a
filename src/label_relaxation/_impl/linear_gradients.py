"""The fused linear loss's gradients: blocks' training rows gathered, then multiplied out.

Each block of rows leaves its gradient ``G = w·(p - q)`` in the block's logits buffer. The three
gradients take it through two matrix products, ``∂x = G·W`` and ``∂W += Gᵀ·x``, and a sum,
``∂b += Σ G``. A row inside the credal set (or ignored) has an exactly zero gradient row, so on
the CPU the rows that train are packed to the front of the buffer and only they enter the
products. Each product reads the whole weight (or its gradient), so a product of few rows costs
nearly as much as one of many: the training rows of several blocks wait in the buffer, the next
block's logits computed behind them, and are multiplied out together once they fill half of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from label_relaxation._impl.fused import compute_dtype

if TYPE_CHECKING:
    from label_relaxation._impl.fused_linear import BlockBuffers, LinearProblem


class Gradients(NamedTuple):
    """Accumulators of the three gradients; ``None`` where no gradient is wanted.

    ``input`` has the input's dtype (each row written once); ``weight`` and ``bias`` accumulate
    over blocks in the compute dtype (float32 for half precision).
    """

    input: Tensor | None
    weight: Tensor | None
    bias: Tensor | None

    @staticmethod
    def allocate(problem: LinearProblem, wanted: tuple[bool, bool, bool]) -> Gradients:
        """Zeroed accumulators for the wanted gradients of ``problem``."""
        dtype = compute_dtype(problem.weight.dtype)
        bias = problem.bias
        return Gradients(
            torch.zeros_like(problem.input) if wanted[0] else None,
            torch.zeros_like(problem.weight, dtype=dtype) if wanted[1] else None,
            torch.zeros_like(bias, dtype=dtype) if wanted[2] and bias is not None else None,
        )

    def finished(self, problem: LinearProblem) -> Gradients:
        """The gradients in the dtypes of their tensors."""
        weight, bias = self.weight, self.bias
        if weight is not None:
            weight = weight.to(problem.weight.dtype)
        if bias is not None and problem.bias is not None:
            bias = bias.to(problem.bias.dtype)
        return Gradients(self.input, weight, bias)


# Rows are packed in this many pieces per block: each piece's copy goes through a temporary of
# its size, so packing adds at most 1/8 of a block to the peak memory in a handful of calls.
PACK_PIECES = 8
# Packing is not measured below this many features, where a row's share of the products is
# smallest; those rows stay in place. Measured (half the rows inside, time / all outside,
# packed against not): 0.89-0.94x against 0.92-1.05x at (512, 64, 2000); 0.85-0.86x against
# 0.94-1.0x at (2048, 256, 32000).
PACK_MIN_HIDDEN = 64
# On AVX-512 CPUs, where rows are packed, a weight-gradient product of fewer rows than
# WEIGHT_ONE_PRODUCT_ROWS runs in pieces of at most WEIGHT_PIECE_ROWS rows. On a 2-core Xeon
# (AVX-512) the float32 GEMM into a (32000, 1024) accumulator took 9-11 ms for up to 47 rows,
# but 22 ms for 48 and 30 ms for 82 as one product, against 17.5 ms for 64 rows and 23.4 ms for
# 82 in pieces of at most 40; from about 140 rows one product is faster. Only from
# WEIGHT_PIECES_MIN_HIDDEN features: at H = 256 the pieces made (2048, 256, 32000) slower (50%
# of the rows inside: 354-369 against 329-333 ms as one product), at H = 512, 1024 and 2048
# faster. On a 2-core AMD EPYC with AVX2 the pieces were slower: 170 against 93 ms for 128 rows,
# 85 against 74 ms for 80 (medians of 7).
WEIGHT_PIECE_ROWS = 40
WEIGHT_ONE_PRODUCT_ROWS = 128
WEIGHT_PIECES_MIN_HIDDEN = 512
WEIGHT_PIECES_CPU_CAPABILITIES = ("AVX512",)


def _pack_training_rows(block_grad: Tensor, trains: Tensor) -> Tensor | None:
    """Move the training rows of ``block_grad`` to its front, in place; return their indices.

    ``None`` when every row trains (nothing to pack). The indices ascend, so the rows of a
    piece only come from positions at or after the piece's own, which no earlier piece has
    overwritten.
    """
    index = trains.nonzero().squeeze(-1)
    count = index.numel()
    if count == trains.numel():
        return None
    piece = max(1, -(-count // PACK_PIECES))
    for start in range(0, count, piece):
        stop = min(start + piece, count)
        block_grad[start:stop] = block_grad[index[start:stop]]
    return index


def _add_weight_product(accumulator: Tensor, grad: Tensor, input: Tensor, in_pieces: bool) -> None:
    """``accumulator += gradᵀ·input``, in pieces where that is faster (see above)."""
    rows = grad.shape[0]
    pieces = 1
    if in_pieces and rows < WEIGHT_ONE_PRODUCT_ROWS:
        pieces = -(-rows // WEIGHT_PIECE_ROWS)
    step = -(-rows // pieces)
    for first in range(0, rows, step):
        piece = slice(first, first + step)
        accumulator.addmm_(grad[piece].t(), input[piece])


class _Waiting(NamedTuple):
    """Training rows of one block that wait in the buffer: ``positions`` None: all its rows."""

    start: int  # the block's first row
    size: int  # how many of its rows wait
    positions: Tensor | None  # their positions in the block, ascending


class PendingRows:
    """Training rows' gradients at the front of the logits buffer, waiting for the products.

    Blocks write their logits at row :attr:`waiting` of ``buffers.logits`` and hand their
    gradient, written over the logits, to :meth:`add`; :meth:`flush` multiplies out whatever
    still waits.
    """

    def __init__(
        self, grads: Gradients, problem: LinearProblem, buffers: BlockBuffers, wait: bool
    ) -> None:
        self.grads, self.problem = grads, problem
        self.buffer, self.product_buffer = buffers.logits, buffers.product
        # Training rows are found on the CPU only (elsewhere that would wait for the device),
        # and only where the products are wide enough to pay for moving the rows.
        self.pack = self.buffer.is_cpu and problem.input.shape[1] >= PACK_MIN_HIDDEN
        self.weight_in_pieces = (
            self.pack
            and problem.input.shape[1] >= WEIGHT_PIECES_MIN_HIDDEN
            and torch.backends.cpu.get_cpu_capability() in WEIGHT_PIECES_CPU_CAPABILITIES
        )
        # Rows wait where the weight gradient runs as one product. With the pieces, on the
        # AVX-512 Xeon, waiting was slower (half the rows inside: 0.76-0.78x of the all-outside
        # time against 0.68-0.73x block by block; the gathered products had 110-130 rows, the
        # slowest per row there); without them it was faster there (0.69-0.76x against
        # 0.79-0.82x). On the AVX2 EPYC, at (4096, 1024, 32000): waiting, one product, 0.71x;
        # block by block in pieces 0.83x.
        self.wait = wait and self.pack and not self.weight_in_pieces
        self._blocks: list[_Waiting] = []

    @property
    def waiting(self) -> int:
        """How many rows wait at the front of the buffer."""
        return sum(block.size for block in self._blocks)

    def add(self, block_grad: Tensor, trains: Tensor, start: int) -> None:
        """Take the gradient of the block starting at row ``start``, ``logits[waiting:]``."""
        index = _pack_training_rows(block_grad, trains) if self.pack else None
        count = block_grad.shape[0] if index is None else index.numel()
        self._blocks.append(_Waiting(start, count, index))
        # Half the buffer stays for the next block, so that its logits' product has rows
        # enough to be efficient.
        if not self.wait or 2 * self.waiting > self.buffer.shape[0]:
            self.flush()

    def flush(self) -> None:
        """Multiply the waiting rows' gradients out into the accumulators."""
        count, blocks = self.waiting, self._blocks
        self._blocks = []
        if count == 0:
            return  # the input gradient of these rows stays zero
        grad = self.buffer[:count]
        if len(blocks) == 1 and blocks[0].positions is None:
            rows: slice | Tensor = slice(blocks[0].start, blocks[0].start + count)
            input = self.problem.input[rows]
        else:
            rows = torch.cat([self._rows(block) for block in blocks])
            input = self.problem.input.index_select(0, rows)
        grads = self.grads
        if grads.input is not None:
            self._add_input_product(grads.input, grad, rows)
        if grads.weight is not None:
            # Half precision: the accumulator and this product are float32, as no
            # half-precision product accumulates across blocks.
            weight_input = input.to(grads.weight.dtype)
            _add_weight_product(grads.weight, grad, weight_input, self.weight_in_pieces)
        if grads.bias is not None:
            grads.bias.add_(grad.sum(0))

    def _rows(self, block: _Waiting) -> Tensor:
        """The problem's row numbers of a waiting block's rows."""
        if block.positions is None:
            return torch.arange(block.start, block.start + block.size, device=self.buffer.device)
        return block.positions + block.start

    def _add_input_product(self, accumulator: Tensor, grad: Tensor, rows: slice | Tensor) -> None:
        """``accumulator[rows] = grad·W`` (each row of the input gradient is written once)."""
        weight = self.problem.weight
        if grad.dtype != weight.dtype:
            # Half precision: the product is computed in the input's dtype, as F.linear's.
            grad = self.product_buffer[: grad.shape[0]].copy_(grad)
        if isinstance(rows, slice):
            torch.mm(grad, weight, out=accumulator[rows])
        else:
            accumulator.index_copy_(0, rows, grad @ weight)
