"""Fused eager implementation: loss and gradient ``p - q`` in one chunked pass over the logits.

Cross-entropy in eager PyTorch writes a full log-softmax in the forward pass and computes one
more exponential pass in the backward pass. Here the forward pass walks the logits in row
chunks small enough to stay in cache and, for each chunk, computes the unnormalised
probabilities (powers of e or 2, whichever is cheaper here: ``ExpBase``), the row statistics
and the finished, already weighted gradient. The backward pass only scales it by the incoming
gradient, and skips even that when the incoming gradient is exactly 1 on the CPU. The logits
are read once from memory and the gradient is written once.

This path runs in plain eager mode only; :mod:`label_relaxation.functional` sends
``torch.compile`` to :mod:`label_relaxation._impl.compiled`, and ``torch.func`` and forward-mode AD
to the pure formulation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from label_relaxation._impl.closed_form import (
    AlphaLike,
    ExpBase,
    exp_base,
    log_alpha_terms,
    log_target_probability,
    relaxation_loss,
)

# CPU: 8 MiB of float32 per chunk wherever a chunk needs its own float32 scratch buffer (forward
# only on narrow rows, half-precision logits): it bounds that buffer, and the chunk and its
# gradient rows together stay inside a 32 MiB L3 cache (the 2-core AMD EPYC this was tuned on).
CHUNK_ELEMENTS = 1 << 21
# CPU, forward only (no gradient written), rows of at least FORWARD_CHUNK_MIN_CLASSES logits:
# 2 MiB chunks, whose reused scratch buffer stays in a core's L2 cache between the passes. On a
# 2-core Intel Xeon (2 MiB of L2 per core), `label-relaxation bench`, two runs each: forward
# 0.74-0.82 against 1.69-1.78 ms at 1024x1000, 1.75-1.89 against 2.98-3.73 ms at 16384x100,
# 10.7-11.2 against 12.0-12.2 ms at 16384x1000, 65.8-68.4 against 69.2-71.5 ms at 4096x32000
# (8 MiB chunks). Narrower rows keep 8 MiB chunks: at 131072x32 the smaller chunks took
# 6.7-6.9 against 5.0-5.2 ms (their per-row gathers and scatters, several per chunk, cost more
# than the cache saves).
FORWARD_CHUNK_ELEMENTS = 1 << 19
FORWARD_CHUNK_MIN_CLASSES = 64
# ... but at least this many rows: every chunk pays its operator calls, and 2 MiB chunks are 16
# rows at 32000 classes and 4 at 128256. With the ten calls per chunk of `_exponent_masses`,
# forward at 2048x128256 took 173 against 266 ms with 32-row chunks, at 4096x32000 107 against
# 122 ms (64 rows: 178 and 98 ms), at 8192x4096 31.1 against 32.5 ms (one process,
# alternating, medians of 7; eager cross-entropy 265, 109 and 32 ms); the forward pass makes
# four or six (`_forward_statistics`). 32 rows of 32000 classes are 2 MiB per thread with 2
# threads.
FORWARD_CHUNK_MIN_ROWS = 32
# Other devices (not measured yet: no GPU was available): each of the ~25 small operations per
# chunk is a kernel launch of a few microseconds, so chunks are large (256 MiB of float32, about
# 0.1 ms of memory traffic per pass on a current datacenter GPU); the bound still caps the
# float32 scratch buffer of half-precision logits at a fraction of a large batch's logits.
DEVICE_CHUNK_ELEMENTS = 1 << 26


def _last_level_cache_bytes() -> int | None:
    """Size of the CPU's largest cache as Linux reports it (``None`` where it does not)."""
    sizes = []
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (entry / "size").read_text().strip()
        except OSError:
            continue
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=None)


def gradient_chunk_elements(cache_bytes: int | None) -> int:
    """Elements per chunk written straight into the gradient on the CPU: a quarter of the cache.

    Such a chunk needs no scratch buffer, so its size only trades cache locality (the chunk
    and its gradient rows, half the cache) against the ~30 operator calls every chunk pays,
    a few of them OpenMP regions. Between 8 MiB (the 32 MiB L3 of a 2-core AMD EPYC, where
    larger chunks were slower) and 128 MiB of float32. On a 2-core Intel Xeon reporting 480 MiB
    of L3, forward+backward at 4096x32000 took 160 ms with 8 MiB chunks, 143 ms with 32 MiB
    and 133-140 ms with 64-128 MiB (medians of 7 interleaved rounds; eager cross-entropy 223 ms).
    """
    if cache_bytes is None:
        return CHUNK_ELEMENTS
    float32_elements = cache_bytes // 4 // 4
    return max(CHUNK_ELEMENTS, min(float32_elements, 1 << 25))


GRADIENT_CHUNK_ELEMENTS = gradient_chunk_elements(_last_level_cache_bytes())


def chunk_rows(logits: Tensor, forward_only: bool = False, scratch: bool = True) -> int:
    """Rows per chunk of ``logits`` ``(N, C)``: cache-sized on the CPU, large elsewhere.

    ``scratch``: the chunk works in a scratch buffer of its size (not in the gradient itself).
    """
    num_classes = logits.shape[-1]
    if logits.device.type != "cpu":
        elements = DEVICE_CHUNK_ELEMENTS
    elif not scratch:
        elements = GRADIENT_CHUNK_ELEMENTS
    else:
        wide = num_classes >= FORWARD_CHUNK_MIN_CLASSES
        if forward_only and wide:
            elements = max(FORWARD_CHUNK_ELEMENTS, FORWARD_CHUNK_MIN_ROWS * num_classes)
        else:
            elements = CHUNK_ELEMENTS
    return max(1, elements // num_classes)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_exponent_shift(logits: Tensor, dtype: torch.dtype, base: ExpBase) -> Tensor:
    """``-max(z)·scale`` of every row of ``logits`` ``(R, C)``, as ``(R, 1)`` in ``dtype``.

    The maximum keeps every exponent at or below 0 (no overflow); the rounding of the product
    is the same for the whole row, so it cancels in every ratio of masses.
    """
    return logits.amax(-1, keepdim=True).to(dtype).mul_(-base.scale)


def exponent(logits: Tensor, neg_shift: Tensor, base: ExpBase, out: Tensor | None = None) -> Tensor:
    """``z·scale - shift`` in one rounding: ATen's add computes ``a + alpha·b`` as an FMA.

    The product ``z·log2(e)`` is never rounded on its own, so large logits close together
    (``1000 ± 3``) keep the precision of ``z - m``, as tested in ``tests/test_values.py``.
    """
    if out is None:
        return torch.add(neg_shift, logits, alpha=base.scale)
    return torch.add(neg_shift, logits, alpha=base.scale, out=out)


def power(exponents: Tensor, base: ExpBase) -> Tensor:
    """``base^exponents``, out of place."""
    return exponents.exp2() if base.two else exponents.exp()


def exp_shifted_into(logits: Tensor, neg_shift: Tensor, work: Tensor, base: ExpBase) -> None:
    """Write the unnormalised probabilities ``exp(z - m)`` of a chunk into ``work``.

    ``work`` may alias ``logits`` (in-place mode): the element-wise add reads each value once.
    """
    exponent(logits, neg_shift, base, out=work)
    if base.two:
        work.exp2_()
    else:
        work.exp_()


class _RowStatistics(NamedTuple):
    """Per-row results of the chunk loop, each ``(N, 1)`` in the compute dtype.

    With ``p'_k = b^(t_k)`` and ``t_k = z_k·scale - shift`` (base ``b`` = e or 2), the masses
    ``rest`` and ``total = rest + p'_y`` are summed directly, and
    ``log p_y = ln(b)·t_y - log(total)`` comes from the exponent, so it stays exact where
    ``p'_y`` underflows. The softmax route (:func:`_probabilities`) leaves the same three
    numbers normalised (``p' = p``, ``total`` 1 up to rounding).
    """

    rest: Tensor  # sum of p'_k over k != y, summed directly: never 1 - p_y
    target: Tensor  # p'_y
    target_shifted: Tensor  # ln p'_y, exact even where p'_y underflows


# CPU gradients are written by ATen's softmax where it may (see _by_softmax). Tests switch it off to
# cover the exponent route that other devices, half precision and in-place mode take.
SOFTMAX_ON_CPU = True
# ATen's softmax over short rows is slow: forward+backward by softmax against the exponent
# route, medians of 9 alternating calls, 2-core Xeon: 8.7 against 3.6 ms at 65536x10, 5.8
# against 6.0 ms at 65536x32, 5.6 against 5.8 at 32768x64, 4.8 against 5.1 at 4096x1000.
SOFTMAX_MIN_CLASSES = 32


def _by_softmax(logits: Tensor, grad_out: Tensor | None) -> bool:
    """Whether the chunks of this call take the softmax route (see :func:`_masses`).

    On the CPU, where the chunks are the gradient itself (``grad_out`` separate memory of the
    logits' own dtype, float32 or float64) and rows have at least ``SOFTMAX_MIN_CLASSES``
    logits, ATen's softmax writes the probabilities in one kernel: the max, the exponential
    sum and the normalised write, one pass fewer over the chunk than the exponent route, and
    122-123 against 136-138 ms per forward+backward at 4096x32000 here (18.0-18.3 against
    20.0-20.2 ms at 16384x1000; two processes each, medians of 7). In place the logits are gone
    before a saturated row could be recomputed from them. Forward passes without a gradient
    decide by ``FORWARD_SOFTMAX_MIN_CLASSES``.
    """
    if grad_out is None or not _softmax_serves(logits, SOFTMAX_MIN_CLASSES):
        return False
    in_place = grad_out.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    return grad_out.dtype == logits.dtype and not in_place


def _softmax_serves(logits: Tensor, min_classes: int) -> bool:
    """Whether ATen's softmax may write this call's probabilities.

    On the CPU, in the logits' own dtype (float32 or float64), rows of at least ``min_classes``.
    """
    return (
        SOFTMAX_ON_CPU
        and logits.device.type == "cpu"
        and logits.dtype == compute_dtype(logits.dtype)
        and logits.shape[-1] >= min_classes
    )


def _masses(
    logits: Tensor, target: Tensor, work: Tensor, stats: _RowStatistics, by_softmax: bool
) -> None:
    """Fill one chunk's rows of ``stats``; leave the masses ``p'`` (``p'_y = 0``) in ``work``.

    ``work`` has the chunk's shape in the compute dtype and may alias ``logits`` (in-place mode);
    ``target`` is ``(R, 1)``; ``by_softmax`` from :func:`_by_softmax`.
    """
    if by_softmax:
        _probabilities(logits, target, work, stats)
    else:
        _exponent_masses(logits, target, work, stats)


def _probabilities(logits: Tensor, target: Tensor, work: Tensor, stats: _RowStatistics) -> None:
    """:func:`_masses` by softmax: ``p`` in ``work``, normalised statistics."""
    _softmax_masses(logits, target, work, stats)
    _exact_log_target(logits, target, stats)


def _softmax_masses(logits: Tensor, target: Tensor, work: Tensor, stats: _RowStatistics) -> None:
    """``p`` in ``work`` (``p_y = 0``), ``p_y`` and the non-target mass in ``stats``: four calls."""
    torch.softmax(logits, -1, out=work)
    torch.gather(work, -1, target, out=stats.target)
    work.scatter_(-1, target, 0.0)
    torch.sum(work, -1, keepdim=True, out=stats.rest)


def _exact_log_target(logits: Tensor, target: Tensor, stats: _RowStatistics) -> None:
    """``log p_y`` of the softmax route's rows into ``stats.target_shifted``.

    ``log(p_y)`` keeps full precision while ``p_y`` is a normal number; rows where it is not (a
    saturated row, the target far below the maximum) get ``z_y - logsumexp(z)`` instead,
    computed for those rows alone. Reading that condition is free on the CPU.
    """
    torch.log(stats.target, out=stats.target_shifted)
    # Above 64 times the smallest normal number p_y has its full relative precision. The
    # comparison is False for NaN (rows of garbage keep their NaN).
    underflow = stats.target < 64 * torch.finfo(stats.target.dtype).tiny
    if bool(underflow.any()):
        rows = underflow.squeeze(-1).nonzero().squeeze(-1)
        saturated = logits[rows]
        exact = saturated.gather(-1, target[rows]) - saturated.logsumexp(-1, keepdim=True)
        stats.target_shifted[rows] = exact


def _exponent_masses(logits: Tensor, target: Tensor, work: Tensor, stats: _RowStatistics) -> None:
    """:func:`_masses` by the shifted exponent: unnormalised ``p'`` in ``work``.

    Passes over the chunk: the max (the only read from memory), the exponent, the exponential
    and the sum; all but the first run in cache.
    """
    base = exp_base(logits.device)
    # Read before work (which may alias the logits) is overwritten.
    target_logit = logits.gather(-1, target).to(work.dtype)
    neg_shift = row_exponent_shift(logits, work.dtype, base)
    exp_shifted_into(logits, neg_shift, work, base)
    torch.mul(exponent(target_logit, neg_shift, base), base.to_natural, out=stats.target_shifted)
    torch.gather(work, -1, target, out=stats.target)
    work.scatter_(-1, target, 0.0)
    torch.sum(work, -1, keepdim=True, out=stats.rest)


# Forward only, CPU rows of at least this many classes take ATen's softmax, four calls per chunk
# (max, exponentials and normalisation in one kernel, row by row in the L1 cache), where the
# exponent route makes six. Alternating with the exponent route in one process (medians of
# 10-12 rounds, up to three runs per shape): 0.87-0.99x its time at 16384x1000, 0.91-0.94x at
# 4096x32000, 0.76-0.88x at 8192x32000, 0.91-0.96x at 2048x128256, 0.94x at 8192x512,
# 0.93x at 65536x64, 0.99x at 16384x256, 0.96-1.01x at 16384x100, 0.97-0.99x at 2048x1000;
# but 1.11x at 131072x32 (ATen's softmax over short rows is slow, see SOFTMAX_MIN_CLASSES).
FORWARD_SOFTMAX_MIN_CLASSES = 64


def forward_statistics(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(rest, log p'_y)`` of ``logits`` ``(N, C)`` without a gradient, ``(N, 1)`` each.

    ``target`` ``(N, 1)`` holds valid class indices. ``rest`` is the non-target mass, summed
    directly, in the scale of ``p'_y`` (normalised or shifted by the row maximum: only their
    ratio has a meaning); the compute dtype.
    """
    stats = _RowStatistics(
        *logits.new_empty((3, logits.shape[0], 1), dtype=compute_dtype(logits.dtype))
    )
    _forward_statistics(logits, target, stats)
    return stats.rest, stats.target_shifted


def _forward_statistics(logits: Tensor, target: Tensor, stats: _RowStatistics) -> None:
    """Fill ``stats`` for a forward pass without a gradient: no masses are kept."""
    if _softmax_serves(logits, FORWARD_SOFTMAX_MIN_CLASSES):
        _forward_by_softmax_statistics(logits, target, stats)
    else:
        _forward_by_exponent_statistics(logits, target, stats)


def _forward_by_softmax_statistics(logits: Tensor, target: Tensor, stats: _RowStatistics) -> None:
    """Four calls per chunk (:func:`_softmax_masses`); ``log p_y`` once after the loop."""

    def step(chunk: slice, work: Tensor) -> None:
        chunk_stats = _RowStatistics(*(stat[chunk] for stat in stats))
        _softmax_masses(logits[chunk], target[chunk], work, chunk_stats)

    for_each_chunk(logits, None, step)
    _exact_log_target(logits, target, stats)


def _forward_by_exponent_statistics(logits: Tensor, target: Tensor, stats: _RowStatistics) -> None:
    """Six calls per chunk, where :func:`_exponent_masses` makes ten.

    Each chunk makes only what the non-target mass needs: the row maximum and the target's
    logit (kept for all rows), the exponent in the scratch buffer, its power, 0 at the target
    and the sum. The target's shifted logit and its mass are formed once for all rows after
    the loop. Alternating with the ten-call route in one process (medians of 10 rounds),
    forward took 0.83-0.95x its time at 131072x32, 16384x100, 16384x1000, 4096x32000,
    8192x32000 and 2048x128256.
    """
    base = exp_base(logits.device)
    dtype = stats.rest.dtype
    # The row maxima and target logits of all rows, in the logits' dtype.
    row_max, target_logit = logits.new_empty((2, logits.shape[0], 1))

    def step(chunk: slice, work: Tensor) -> None:
        chunk_logits, chunk_max, chunk_target = logits[chunk], row_max[chunk], target[chunk]
        # Read while the chunk is in cache: after the loop each row's would be a cache miss.
        torch.gather(chunk_logits, -1, chunk_target, out=target_logit[chunk])
        torch.amax(chunk_logits, -1, keepdim=True, out=chunk_max)
        # Half-precision maxima are promoted first, so that z - m is formed in the compute dtype.
        shift = chunk_max if chunk_max.dtype == dtype else chunk_max.to(dtype)
        if base.two:
            exponent(chunk_logits, shift.mul(-base.scale), base, out=work).exp2_()
        else:
            torch.sub(chunk_logits, shift, out=work).exp_()
        # Zeroed after the power, not -inf before it: ATen's vectorised exp takes a slow path
        # for every vector that holds an infinity (131072x32 forward 1.23x the time).
        work.scatter_(-1, chunk_target, 0.0)
        torch.sum(work, -1, keepdim=True, out=stats.rest[chunk])

    for_each_chunk(logits, None, step)
    torch.sub(target_logit.to(dtype), row_max.to(dtype), out=stats.target_shifted)
    torch.exp(stats.target_shifted, out=stats.target)


def _write_gradient(
    work: Tensor, target: Tensor, stats: _RowStatistics, alpha: AlphaLike, row_weight: Tensor
) -> Tensor:
    """Turn the chunk's ``p'`` in ``work`` into ``w·(p - q)``, one more pass in cache.

    ``target``, ``row_weight``, a tensor ``alpha`` and the ``stats`` are the chunk's ``(R, 1)``.
    Returns the ``(R, 1)`` mask of rows whose gradient may be nonzero (active and counted).
    """
    total = stats.rest + stats.target
    r = stats.rest / total
    # Not `r > alpha`: that is False for NaN, and NaN logits must give NaN, as in cross-entropy.
    active = ~(r <= alpha)
    # Off-target entries: p_k·(1 - alpha/r) with p_k = p'_k/total. Target entry:
    # p_y - (1 - alpha) = alpha - r. Both vanish inside the credal set. The weight
    # multiplies last: 0 (ignored) gives exact zeros, NaN (an unchecked bad target) NaN.
    work.mul_(row_weight * torch.where(active, (1 - alpha / r) / total, 0.0))
    work.scatter_(-1, target, row_weight * torch.where(active, alpha - r, 0.0))
    return active & (row_weight != 0)


def _loss_from_statistics(stats: _RowStatistics, alpha: AlphaLike, row_weight: Tensor) -> Tensor:
    """Weighted loss of every row from its statistics.

    Temporaries are updated in place: for tiny batches these ``(N, 1)`` rows are the memory.
    """
    total = stats.rest + stats.target
    r = stats.rest / total
    # Not `r > alpha`: that is False for NaN, and NaN logits must give NaN, as in cross-entropy.
    active = ~(r <= alpha)
    log_total = total.log_()
    # Inactive rows (log r unused) take 0, so that log(0) never meets the arithmetic below.
    log_r = torch.where(active, stats.rest.log().sub_(log_total), 0.0)
    log_p_target = log_target_probability(r, stats.target_shifted, log_total)
    log_alpha, log1m_alpha = log_alpha_terms(alpha)
    loss = relaxation_loss(log_p_target, log_r, alpha, log_alpha, log1m_alpha)
    loss = loss.masked_fill_(~active, 0.0).mul_(row_weight)
    # An ignored row (weight 0) is 0 even when its logits were garbage (NaN, all -inf).
    return loss.masked_fill_(row_weight == 0, 0.0)


def _clear_uncounted_garbage_rows(grad: Tensor, stats: _RowStatistics, row_weight: Tensor) -> None:
    """Zero the gradient of ignored rows whose logits were garbage.

    Garbage: only ``-inf``, NaN, or magnitudes whose scaling by ``log2(e)`` overflows, that is
    rows without a finite, positive mass.
    """
    total = stats.rest + stats.target
    garbage = ~(torch.isfinite(total) & (total > 0)) & (row_weight == 0)
    if grad.device.type != "cpu" or bool(garbage.any()):
        # Reading the flag is free on the CPU; elsewhere one pass beats a device sync.
        grad.masked_fill_(garbage, 0.0)


def for_each_chunk(
    logits: Tensor, grad_out: Tensor | None, step: Callable[[slice, Tensor], None]
) -> None:
    """Walk ``logits`` ``(N, C)`` in row chunks (``chunk_rows``).

    ``step(rows, work)`` gets the chunk's row slice and a work buffer of the chunk's shape in
    the compute dtype: the chunk of ``grad_out`` itself when it has that dtype (possibly the
    logits, in-place mode), else a reused scratch buffer that is copied into ``grad_out``
    (half-precision gradients) or dropped (forward only, ``grad_out`` is ``None``).
    """
    rows, num_classes = logits.shape
    dtype = compute_dtype(logits.dtype)
    direct = grad_out is not None and grad_out.dtype == dtype
    step_rows = chunk_rows(logits, forward_only=grad_out is None, scratch=not direct)
    scratch = None
    if not direct:
        scratch = logits.new_empty((min(step_rows, rows), num_classes), dtype=dtype)
    for start in range(0, rows, step_rows):
        chunk = slice(start, min(start + step_rows, rows))
        if grad_out is not None and direct:
            work = grad_out[chunk]
        else:
            assert scratch is not None
            work = scratch[: chunk.stop - start]
        step(chunk, work)
        if grad_out is not None and not direct:
            grad_out[chunk].copy_(work)


def fused_rows(
    logits: Tensor,
    target: Tensor,
    alpha: AlphaLike,
    row_weight: Tensor,
    grad_out: Tensor | None,
    trains: Tensor | None = None,
) -> Tensor:
    """Weighted loss rows of ``logits`` ``(N, C)``; optionally write the gradient to ``grad_out``.

    ``grad_out`` is ``None`` (forward only: a single chunk-sized scratch buffer is reused),
    a fresh ``(N, C)`` tensor, or ``logits`` itself (in-place mode). With a gradient, an
    ``(N,)`` bool ``trains`` receives which rows have one that may be nonzero: the other rows'
    gradients are exact zeros (inside the credal set, or not counted).
    """
    stats = _RowStatistics(
        *logits.new_empty((3, logits.shape[0], 1), dtype=compute_dtype(logits.dtype))
    )
    target = target.unsqueeze(-1)
    row_weight = row_weight.unsqueeze(-1)
    column_alpha = alpha.unsqueeze(-1) if isinstance(alpha, Tensor) else alpha
    if grad_out is None:
        _forward_statistics(logits, target, stats)
        return _loss_from_statistics(stats, column_alpha, row_weight).squeeze(-1)
    by_softmax = _by_softmax(logits, grad_out)

    def step(chunk: slice, work: Tensor) -> None:
        chunk_stats = _RowStatistics(*(stat[chunk] for stat in stats))
        _masses(logits[chunk], target[chunk], work, chunk_stats, by_softmax)
        if grad_out is not None:
            chunk_alpha = column_alpha[chunk] if isinstance(column_alpha, Tensor) else column_alpha
            has_gradient = _write_gradient(
                work, target[chunk], chunk_stats, chunk_alpha, row_weight[chunk]
            )
            if trains is not None:
                trains[chunk] = has_gradient.squeeze(-1)

    for_each_chunk(logits, grad_out, step)
    if grad_out is not None:
        _clear_uncounted_garbage_rows(grad_out, stats, row_weight)
    return _loss_from_statistics(stats, column_alpha, row_weight).squeeze(-1)


DOUBLE_BACKWARD = (
    "label_relaxation: the fused implementation computes its gradient in the forward "
    "pass and supports first-order reverse mode only. For double backward "
    "(create_graph=True, Hessians), call it with implementation='reference', or use "
    "torch.func transforms, which use that implementation automatically."
)
_SECOND_BACKWARD = (
    "label_relaxation: backward was called a second time through the same graph "
    "(retain_graph=True) after the first one scaled the fused implementation's gradient "
    "buffer in place by an incoming gradient other than 1. Call it with "
    "implementation='reference' to backpropagate through the same graph more than once."
)


RowsKernel = Callable[[Tensor | None], Tensor]


def needs_gradient(logits: Tensor) -> bool:
    """Whether a call must build an autograd node for ``logits``."""
    return logits.requires_grad and torch.is_grad_enabled()


def apply_fused(logits: Tensor, kernel: RowsKernel, reduce: bool, inplace: bool) -> Tensor:
    """The loss of a fused ``kernel`` over ``logits`` ``(N, C)``: summed, or per row.

    Without a gradient to compute the kernel runs forward only (no gradient buffer, no node);
    otherwise through :class:`FusedLoss`, which keeps the gradient written in the forward pass.
    """
    if not needs_gradient(logits):
        loss_rows = kernel(None)
        return loss_rows.sum() if reduce else loss_rows
    loss: Tensor = FusedLoss.apply(logits, kernel, reduce, inplace)
    return loss


class FusedLoss(torch.autograd.Function):
    """Autograd node of the fused kernels: the forward pass stores the finished gradient.

    ``kernel(grad_out)`` returns the weighted loss rows and writes their gradient with respect
    to ``logits`` into ``grad_out`` (a fresh buffer, or ``logits`` itself in in-place mode).
    The node runs in plain eager mode only, so it uses the ``forward(ctx, ...)`` form: with a
    separate ``setup_context`` (needed only by ``torch.func``) each call cost about 30 µs more
    (torch 2.15, ``bench/profile_small.py``), more than the whole kernel of a small batch.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, kernel: RowsKernel, reduce: bool, inplace: bool
    ) -> Tensor:
        """Return the loss, the sum of weighted rows when ``reduce``; keep the gradient."""
        grad = logits if inplace else torch.empty_like(logits)
        loss_rows = kernel(grad)
        # Autograd frees the saved gradient with the graph, as any saved tensor.
        ctx.save_for_backward(grad)
        ctx.set_materialize_grads(False)
        ctx.scaled_in_place = False
        return loss_rows.sum() if reduce else loss_rows

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None) -> tuple[Tensor | None, ...]:
        """Scale the stored gradient by ``grad_loss``, handing the buffer over where possible."""
        none = (None, None, None)
        if grad_loss is None:
            return (None, *none)
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD)
        if ctx.scaled_in_place:
            raise RuntimeError(_SECOND_BACKWARD)
        (grad,) = ctx.saved_tensors
        if grad_loss.dim() > 0:
            # reduction="none": a full pass is needed anyway; out of place keeps the graph
            # reusable (gradcheck, jacobians).
            return (grad * grad_loss.unsqueeze(-1).to(grad.dtype), *none)
        # On the CPU reading the scalar is a plain memory read, not a device sync, and
        # loss.backward() passes exactly 1: then the buffer is handed over untouched.
        if grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            return (grad, *none)
        ctx.scaled_in_place = True
        return (grad.mul_(grad_loss.to(grad.dtype)), *none)
