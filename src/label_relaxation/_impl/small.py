"""Fused eager kernel for small inputs: loss and gradient in about 25 operator calls.

At classification sizes (a 64×10 batch, about a million logits at most) a call costs
what its operator calls cost, a few microseconds each, not what its arithmetic costs. This
kernel therefore spends calls sparingly: the row maximum, one subtraction written into the
gradient buffer itself and one in-place ``exp`` give the unnormalised probabilities (ATen's
``log_softmax`` over a short last dimension costs more than these three calls together); the
non-target mass ``r·total`` is summed directly (``r = 1 - p_y`` is never formed by a
subtraction); ``log p_y`` comes from the shifted target logit, so it is exact where ``p_y``
underflows; and every per-row quantity is a handful of ``(N, 1)`` operations with the
Python-float alpha and the row weight shared by every row folded into their constants. Without
a gradient (evaluation loops) the per-row part works in log space, in eight calls, since
nothing there needs ``r - alpha`` to float32's relative precision. Where alpha is at least 0.1
and rows are narrow, a forward pass without a gradient takes ``-log p_y`` from ATen's
cross-entropy instead, one call where the kernel makes about twenty, within bounds measured
to keep the precision of the other paths (:func:`_by_cross_entropy`); on a CPU where ATen runs
its AVX2 kernels, so does a small batch with a gradient, which then flows through
cross-entropy's own autograd nodes times ``d loss / d ce`` (:class:`_CrossEntropyRows`).

The chunked kernel (:mod:`label_relaxation._impl.fused`) takes over above :data:`SMALL_ELEMENTS`,
where passes over memory, not calls, set the cost: with a gradient wholly, without one for the
row statistics only (:func:`~label_relaxation._impl.fused.forward_statistics`, which holds no
full-size temporary), while the arguments and the per-row part stay here, a few dozen calls
fewer than the general path's. :func:`small_call` prepares the arguments (one ``aminmax``
reads and checks the targets) and falls back, returning ``None``, where the general path must
run.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from label_relaxation._impl import validation as check
from label_relaxation._impl.closed_form import CPU_RUNS_AVX2, AlphaLike, exp_base
from label_relaxation._impl.fused import (
    DOUBLE_BACKWARD,
    apply_fused,
    compute_dtype,
    exponent,
    forward_statistics,
    needs_gradient,
    row_exponent_shift,
)

# Up to 2^20 logits (4 MiB of float32). Against the chunked kernel on a 2-core AVX-512 Xeon (one
# process, alternating, medians of 9 blocks, two runs), this kernel took 0.5-0.9x its time per
# forward+backward at 512x1000, 1024x1000, 4096x256, 16384x64, 65536x10 and 256x4096, and
# 0.5-1.0x per forward but for one run at 4096x256 (1.1x). Above that the forward's full-size
# temporary leaves the cache, which the chunked kernel's reused scratch buffer avoids: forward
# at 2048x1000 and 4096x1000 took 1.1-1.2x the chunked kernel's time.
SMALL_ELEMENTS = 1 << 20

# Base 2 (an AVX2 CPU, see ExpBase) saves about 0.5 ns per logit on the exponential (2-core AMD
# EPYC, torch 2.15: ATen's exp2 of 256x1000 float32 148 against 272 µs for exp) and costs two
# calls on (N, 1) columns, a few µs: below this many logits it does not pay.
BASE_TWO_MIN_ELEMENTS = 1 << 14

RowWeight = float | Tensor


def small_rows(
    logits: Tensor,
    index: Tensor,
    alpha: float,
    row_weight: RowWeight,
    ignored: Tensor | None,
    grad_out: Tensor | None,
) -> Tensor:
    """Weighted loss of every row of ``logits`` ``(N, C)``, as ``(N, 1)``.

    Args:
        logits: Rows of logits, any floating dtype.
        index: ``(N, 1)`` int64 valid class indices (ignored rows hold any valid class).
        alpha: The relaxation, a Python float in (0, 1).
        row_weight: Each row's weight, already divided by the mean's denominator: a Python
            float shared by every row, or ``(N, 1)`` in the compute dtype.
        ignored: ``(N, 1)`` bool, rows that do not count, or ``None`` when all count; they get
            exactly zero loss and gradient whatever their logits hold.
        grad_out: ``None`` (loss only) or an ``(N, C)`` buffer that receives ``w·(p - q)``.

    Returns:
        The weighted loss rows, ``(N, 1)`` in the compute dtype.
    """
    dtype = compute_dtype(logits.dtype)
    # A Python float is one weight shared by every row (folded into the constants); a tensor
    # holds each row's own weight.
    shared_weight, own_weights = (
        (row_weight, None) if isinstance(row_weight, float) else (None, row_weight)
    )
    const = _constants(alpha, shared_weight, dtype)
    if grad_out is None:
        if logits.numel() > SMALL_ELEMENTS:
            # Larger inputs without a gradient: the chunked kernel's statistics, which never
            # hold a full-size temporary, and this kernel's per-row part.
            rest, target_shifted = forward_statistics(logits, index)
        else:
            mass, target_shifted = _masses(logits, index, dtype, None)
            rest = mass.sum(-1, keepdim=True)
        loss = _loss_without_gradient(rest, target_shifted, const)
        return _weighted(loss, own_weights, ignored)
    direct = grad_out.dtype == dtype
    mass, target_shifted = _masses(logits, index, dtype, grad_out if direct else None)
    rest = mass.sum(-1, keepdim=True)
    loss, scale = _loss_and_scale(rest, target_shifted, const)
    loss = _weighted(loss, own_weights, ignored)
    _write_gradient(mass, index, rest, scale, own_weights, ignored, const.zero)
    if not direct:
        grad_out.copy_(mass)
    return loss


def _masses(
    logits: Tensor, index: Tensor, dtype: torch.dtype, out: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(p', z_y - m)``: the unnormalised probabilities with ``p'_y = 0``, in ``out`` if given.

    ATen's log_softmax over a short last dimension costs several times these calls. Half
    precision logits minus a float32 column promote to float32 in the same call. Where base 2
    is the cheaper exponential (:func:`~label_relaxation._impl.closed_form.exp_base`) and the
    batch large enough for it to pay for its two extra ``(N, 1)`` calls, ``p'`` and ``z_y - m``
    carry the rounding of the shift ``m·log2(e)``, a factor common to the whole row that
    cancels in the loss and the gradient (as in the chunked kernel).
    """
    base = exp_base(logits.device)
    if base.two and logits.numel() >= BASE_TWO_MIN_ELEMENTS:
        exponents = exponent(logits, row_exponent_shift(logits, dtype, base), base, out=out)
        target_shifted = exponents.gather(-1, index).mul_(base.to_natural)
        mass = exponents.exp2_()
    else:
        row_max = logits.amax(-1, keepdim=True)
        if row_max.dtype != dtype:
            row_max = row_max.to(dtype)
        shifted = (
            torch.sub(logits, row_max, out=out) if out is not None else torch.sub(logits, row_max)
        )
        target_shifted = shifted.gather(-1, index)
        mass = shifted.exp_()
    mass.scatter_(-1, index, 0.0)
    return mass, target_shifted


def _weighted(loss: Tensor, own_weights: Tensor | None, ignored: Tensor | None) -> Tensor:
    """``loss`` rows times their own weights, rows that do not count set to 0 (in place)."""
    if own_weights is not None:
        loss = loss.mul_(own_weights)
    if ignored is not None:
        loss = loss.masked_fill_(ignored, 0.0)
    return loss


def _loss_without_gradient(rest: Tensor, target_shifted: Tensor, const: _Constants) -> Tensor:
    """``w·loss`` per row from the non-target mass ``rest`` and ``z_y - m``, both ``(N, 1)``.

    In log space: ``log(total) = logaddexp(log(rest), z_y - m)`` keeps the relative precision
    of the smaller term (where y is the maximum it is ``log1p(rest)``) in one call, and
    ``log r = log(rest) - log(total)`` decides: eight calls per row, where
    :func:`_loss_and_scale` takes twelve to form what the gradient needs as well.
    A row whose ``rest`` is 0 has ``log r = -inf``: inside. The comparison is False for NaN.
    """
    log_rest = rest.log()
    log_total = torch.logaddexp(log_rest, target_shifted)
    log_r = log_rest.sub_(log_total)
    inside = torch.le(log_r, const.log_alpha)
    # (1-a)·(log(1-a) - log p_y) + a·(log a - log r) with log p_y = (z_y - m) - log(total)
    # is c + (1-a)·log(total) - (1-a)·(z_y - m) - a·log r; w is in every constant.
    loss = torch.addcmul(const.offset_w, log_total, const.one_minus_alpha_w)
    loss = loss.addcmul_(target_shifted, const.alpha_minus_one_w)
    return loss.addcmul_(log_r, const.neg_alpha_w).masked_fill_(inside, 0.0)


def _loss_and_scale(
    rest: Tensor, target_shifted: Tensor, const: _Constants
) -> tuple[Tensor, Tensor]:
    """``(w·loss, w·(r - alpha)/rest)`` per row, ``(N, 1)`` each: the gradient needs the second.

    ``w·(r - alpha)/rest = w/total - w·alpha/rest`` is formed from ``rest`` and ``total``
    directly (never from ``1 - p_y``), so that the gradient keeps float32's relative precision
    right up to the boundary of the set: the difference is as well conditioned as
    ``rest - alpha·total``.
    """
    # log(total) = logaddexp(log(rest), z_y - m) keeps the relative precision of rest where y
    # is the row's maximum (it is log1p(rest) there); r = 1 - p_y is never formed by a
    # subtraction. total = exp(log(total)) is within a few ulp (|log(total)| <= log C), and
    # w/total is divided, not exp(log w - log(total)): the exponent's rounding (|log w| up to
    # 12 for a mean over 2^17 rows) took the gradient's error to 0.96e-6 of its scale.
    log_rest = rest.log()
    log_total = torch.logaddexp(log_rest, target_shifted)
    weight_over_total = torch.div(const.weight, log_total.exp())
    # One decision, inside the credal set or not, for loss and gradient: the sign of r - alpha
    # with r = rest/total, that of w/total - w·alpha/rest. A row whose rest is 0 gets -inf:
    # inside. The comparison is False for NaN: NaN logits give NaN, as in cross-entropy.
    scale = torch.addcdiv(weight_over_total, const.neg_alpha_w, rest)
    inside = torch.le(scale, const.zero)
    # (1-a)·(log(1-a) - log p_y) + a·(log a - log r), with log p_y = (z_y - m) - log(total)
    # and log r = log(rest) - log(total), is log(total) - (1-a)·(z_y - m) - a·log(rest) + c;
    # times w: w·c + w·log(total), then the other two terms, each with w in its constant.
    loss = torch.addcmul(const.offset_w, log_total, const.weight)
    loss = loss.addcmul_(target_shifted, const.alpha_minus_one_w)
    loss = loss.addcmul_(log_rest, const.neg_alpha_w).masked_fill_(inside, 0.0)
    return loss, scale


class _Constants(NamedTuple):
    """The kernel's scalar operands as 0-d tensors of the compute dtype.

    A Python number as the operand of a binary operation costs ATen a fresh wrapped tensor on
    every call: about 2.2 µs against 0.7 µs for a 0-d tensor (``a.add_(1.0)`` against
    ``a.add_(one)`` on a ``(64, 1)`` float32 tensor, torch 2.15, 2-core Xeon), and the kernel
    has about ten such operations.
    """

    zero: Tensor
    log_alpha: Tensor
    # The shared row weight w (1 where rows have their own weights) and the loss's constants
    # times w, so that no call multiplies by it.
    weight: Tensor
    neg_alpha_w: Tensor  # -a·w
    one_minus_alpha_w: Tensor  # (1-a)·w
    alpha_minus_one_w: Tensor  # (a - 1)·w
    offset_w: Tensor  # ((1-a)·log(1-a) + a·log(a))·w
    # -log(1-a): a row whose cross-entropy -log p_y is at most this lies inside the set.
    inside_cross_entropy: Tensor


@functools.lru_cache(maxsize=256)
def _constants(alpha: float, shared_weight: float | None, dtype: torch.dtype) -> _Constants:
    """The constants of one ``(alpha, shared row weight, dtype)``; a schedule needs few."""
    offset = (1 - alpha) * math.log1p(-alpha) + alpha * math.log(alpha)
    # A shared weight of 0 (a mean over no rows) never reaches the kernel: the batch is empty.
    weight = 1.0 if shared_weight is None else shared_weight
    values = [0.0, math.log(alpha), weight, -alpha * weight, (1 - alpha) * weight]
    values += [(alpha - 1) * weight, offset * weight, -math.log1p(-alpha)]
    # On the CPU explicitly: a default device set by the caller (torch.set_default_device, a
    # `with torch.device(...)` block) must not move the kernel's operands.
    return _Constants(*torch.tensor(values, dtype=dtype, device="cpu").unbind())


def _write_gradient(
    mass: Tensor,
    index: Tensor,
    rest: Tensor,
    scale: Tensor,
    weight: Tensor | None,
    ignored: Tensor | None,
    zero: Tensor,
) -> None:
    """Turn the unnormalised ``p'`` in ``mass`` (target entries zeroed) into ``w·(p - q)``.

    With ``r = rest/total`` and ``scale = w·(r - alpha)/rest`` (``w`` the shared row weight, 1
    where rows have their own; updated in place): off-target entries
    ``w·p_k·(1 - alpha/r) = p'_k·scale``, the target entry ``-w·(r - alpha) = -scale·rest``.
    Clamping at 0 zeroes the rows inside the credal set and keeps NaN. ``weight`` holds the
    rows' own weights (``(N, 1)``), ``None`` where they share one; ``zero`` is a 0-d zero of
    the compute dtype.
    """
    scale = scale.clamp_min_(0.0)
    if weight is not None:
        scale = scale.mul_(weight)
    # -scale·rest in one call, the row weight included; 0 + (-0) gives rows inside the set +0.
    target_grad = torch.addcmul(zero, scale, rest, value=-1.0)
    mass.mul_(scale)
    mass.scatter_(-1, index, target_grad)
    if ignored is not None:
        # Rows that do not count may hold garbage (NaN, only -inf) that 0·NaN would keep.
        mass.masked_fill_(ignored, 0.0)


def _small_alpha(alpha: AlphaLike, validate: bool) -> float | None:
    """Alpha as a Python float for the small-input kernel, or ``None`` where it cannot serve.

    A float, or a 0-d CPU tensor without grad (a module's buffer: reading it is free).
    """
    if not isinstance(alpha, Tensor):
        check.check_alpha_float(alpha)
        return float(alpha)
    if alpha.dim() != 0 or not alpha.is_cpu or alpha.requires_grad:
        return None
    check.check_alpha_tensor(alpha, torch.Size())
    value = float(alpha)
    if 0.0 < value < 1.0:
        return value
    if validate:
        check.check_alpha_values(alpha)
    return None  # unchecked: the general path turns it into NaN


def _small_index(
    target: Tensor, num_classes: int, ignore_index: int, validate: bool
) -> tuple[Tensor, Tensor | None] | None:
    """``(index, counted)`` of class-index targets, ``(N, 1)`` each, read and checked at once.

    One ``aminmax`` decides the common case (every index in range and ``ignore_index`` outside
    the range of values: ``counted`` is ``None``); only other batches look further.
    ``None`` where an unchecked bad index must become NaN on the general path.
    """
    index = target.reshape(-1, 1)
    low, high = (int(bound) for bound in torch.aminmax(index))
    if low >= 0 and high < num_classes and not low <= ignore_index <= high:
        return (index if index.dtype == torch.int64 else index.long()), None
    counted = index != ignore_index
    if not bool((counted <= ((index >= 0) & (index < num_classes))).all()):
        if validate:
            check.check_index_values(target, num_classes, ignore_index)
        return None
    return torch.where(counted, index, 0).long(), counted


def _small_row_weight(
    weight: Tensor | None,
    counted: Tensor | None,
    index: Tensor,
    dtype: torch.dtype,
    reduction: str,
) -> tuple[RowWeight, Tensor | None]:
    """``(row_weight, ignored)`` for the small-input kernel.

    Without class weights and ignored rows every row shares one Python float (``1/N`` for the
    mean), which the kernel folds into its constants; otherwise ``(N, 1)`` weights divided by
    their sum for the mean, as ``nn.CrossEntropyLoss`` does (an all-ignored batch gives 0), and
    the rows of weight 0, which the kernel zeroes whatever their logits hold.
    """
    compute = compute_dtype(dtype)
    if weight is None:
        if counted is None:
            return (1.0 / index.shape[0] if reduction == "mean" else 1.0), None
        row_weight = counted.to(compute)
    else:
        row_weight = weight.to(compute)[index]
        if counted is not None:
            row_weight = torch.where(counted, row_weight, 0.0)
    if reduction == "mean":
        total = float(row_weight.sum())
        if total != 0:
            row_weight = row_weight / total
    return row_weight, row_weight == 0


# Forward only, the loss can take -log p_y from ATen's cross-entropy: one call that also checks
# the targets and handles ignore_index, where the kernel above makes about twenty. Its
# r = 1 - p_y = -expm1(-ce) inherits ce's absolute rounding, which includes the target's own
# mass (log(1 + rest) is rounded at the scale of 1, not of rest), so r's relative error grows
# with C and 1/r. Rows just outside the set (r = 1.5-3 alpha, where the loss is far smaller
# than its terms) had a relative loss error of 4-9.4e-6 with C <= 128 and 2.0e-5 with C = 1000
# at alpha 0.1, 0.7-4.3e-5 at alpha 0.05 (2000-3000 rows each; the kernel above: 2.7-4.7e-6).
# Within these bounds it stays below 1e-5, the level of every other path.
CROSS_ENTROPY_MIN_ALPHA = 0.1
CROSS_ENTROPY_MAX_CLASSES = 128
# ATen's log_softmax over 3-15 classes runs a scalar loop (8 ns per logit on a 2-core AVX-512
# Xeon, torch 2.15; 1 ns from 16 classes on, and at 2): against the kernel above the route took
# 0.8-0.9x its time at 128x10 and 256x10, 1.0x at 512x10, 1.5x at 4096x10 (and 0.5-0.6x at
# 128-4096 rows of 16-128 classes). Such narrow rows take it up to this many logits only.
CROSS_ENTROPY_NARROW_ELEMENTS = 4096
# Not where ATen runs its AVX2 kernels: there its scalar loop covers rows of fewer than 8
# float32 logits (14-17 ns per logit, 2-core AMD EPYC, torch 2.15), but the kernel above is
# slower still on short rows (amax and scatter_ of 4096x10 took 58 and 69 µs): the route took
# 0.52-0.75x its time at 64x10, 128x10, 512x2, 1024x8, 4096x2, 4096x10, 16384x12 and 65536x10,
# 1.0x at 4096x7 (float32, alternating, medians of 11 rounds), 0.49-0.96x in float64.
CROSS_ENTROPY_NARROW_LIMITED = not CPU_RUNS_AVX2
# With a gradient, cross-entropy's autograd nodes (log_softmax and its backward) replace the
# kernel's dozen calls over the rows where ATen runs its AVX2 kernels, up to this many logits:
# forward+backward took 0.82-0.93x the kernel's time at 64x10, 128x10, 256x100, 4096x10,
# 8192x10, 16384x10, 4096x2 and 4096x32, but 1.02-1.06x at 2048x64 and 1024x128 (131072
# logits; 2-core AMD EPYC, alternating, medians of 11 rounds), where its three full-size
# buffers cost more than the kernel's one.
CROSS_ENTROPY_GRADIENT = CPU_RUNS_AVX2
CROSS_ENTROPY_GRADIENT_MAX_ELEMENTS = 1 << 16


def _by_cross_entropy(
    rows: Tensor,
    target: Tensor,
    alpha: float,
    ignore_index: int,
    reduction: str,
    validate: bool,
    ignored: bool,
) -> Tensor | None:
    """The loss from ATen's per-row cross-entropy ``-log p_y``, with its gradient if needed.

    ``rows`` are ``(N, C)`` float32 or float64 logits of at most
    :data:`CROSS_ENTROPY_MAX_CLASSES` classes, ``alpha >= CROSS_ENTROPY_MIN_ALPHA``, and there
    are no class weights; ``ignored`` from :func:`_any_ignored` (False with a gradient), read
    for a mean only. Returns the reduced loss, or ``(N,)`` with ``reduction="none"``;
    ``None`` where an unchecked bad target must become NaN on the general path. With a
    gradient, cross-entropy's own autograd nodes carry it: the loss depends on the logits only
    through ``ce = -log p_y``, with ``d loss / d ce = 1 - alpha/r`` outside the set
    (:class:`_CrossEntropyRows`).
    """
    num_classes = rows.shape[-1]
    # A view costs a call: 1-D int64 targets (the usual batch) are taken as they are.
    index = target if target.dim() == 1 else target.reshape(-1)
    if index.dtype != torch.int64:
        index = index.long()  # cross_entropy takes int64 class indices only
    try:
        # Ignored rows get 0 (as if p_y = 1: inside the set), whatever their logits hold.
        cross_entropy = torch.nn.functional.cross_entropy(
            rows, index, ignore_index=ignore_index, reduction="none"
        )
    except IndexError:
        if validate:
            check.check_index_values(target, num_classes, ignore_index)  # our message
        return None
    # A mean over every row folds 1/N into the constants, as the kernel above does; a batch
    # with ignored rows divides the sum instead, so that each count does not make constants.
    counted = int(index.ne(ignore_index).sum()) if reduction == "mean" and ignored else None
    shared_weight = 1.0 / index.shape[0] if reduction == "mean" and counted is None else 1.0
    const = _constants(alpha, shared_weight, cross_entropy.dtype)
    # An all-ignored batch: its sum is 0, and so is its mean.
    divisor = None if counted is None else max(counted, 1)
    if cross_entropy.requires_grad:
        loss: Tensor = _CrossEntropyRows.apply(cross_entropy, const, reduction != "none", divisor)
        return loss
    loss = _loss_from_cross_entropy(cross_entropy, const)[0]
    if reduction == "none":
        return loss
    return loss.sum() if divisor is None else loss.sum().div_(divisor)


def _loss_from_cross_entropy(
    cross_entropy: Tensor, const: _Constants
) -> tuple[Tensor, Tensor, Tensor]:
    """``(w·loss, inside, r)`` per row from ``ce = -log p_y`` ``(N,)``; ``r = 1 - p_y``."""
    # r = -expm1(-ce) keeps ce's relative precision, and r = 1 gives log r = 0 where p_y
    # underflows.
    r = cross_entropy.neg().expm1_().neg_()
    log_r = r.log()
    # (1-a)·log((1-a)/p_y) + a·log(a/r) = c + (1-a)·ce - a·log r, w in every constant. Inside
    # rows (ignored ones too: ce = 0, log r = -inf) are set to 0; NaN compares False.
    loss = torch.addcmul(const.offset_w, cross_entropy, const.one_minus_alpha_w)
    loss = loss.addcmul_(log_r, const.neg_alpha_w)
    inside = torch.le(cross_entropy, const.inside_cross_entropy)
    return loss.masked_fill_(inside, 0.0), inside, r


class _CrossEntropyRows(torch.autograd.Function):
    """The loss as a function of each row's cross-entropy: ``d loss / d ce = w·(1 - alpha/r)``.

    The loss depends on the logits only through ``p_y``: with ``r = 1 - p_y`` and
    ``ce = -log p_y``, cross-entropy's gradient ``p - e_y`` times ``1 - alpha/r`` is ``p - q``
    (``q_y = 1 - alpha``, ``q_k = alpha·p_k/r``); rows inside the set get exactly 0. ``r``
    comes from ``ce`` (``-expm1(-ce)``), so it carries ce's absolute rounding: within
    :data:`CROSS_ENTROPY_MIN_ALPHA` and :data:`CROSS_ENTROPY_MAX_CLASSES` the gradient met the
    tests' bound of 1e-6 of ``|p| + |q|`` per entry, rows just outside the set (``r`` =
    1.5-3 alpha) included.
    """

    @staticmethod
    def forward(
        ctx: Any, cross_entropy: Tensor, const: _Constants, reduce: bool, divisor: int | None
    ) -> Tensor:
        """Return the weighted loss rows (summed when ``reduce``, then divided by ``divisor``)."""
        loss, inside, r = _loss_from_cross_entropy(cross_entropy, const)
        # w·(1 - alpha/r) = w - w·alpha/r: rounded at the scale of w, as p - q is at p's scale.
        # -0 inside: cross-entropy's backward negates it at the target, which then holds +0.
        slope = torch.addcdiv(const.weight, const.neg_alpha_w, r).masked_fill_(inside, -0.0)
        if divisor is not None:
            slope = slope.div_(divisor)
        ctx.save_for_backward(slope)
        if not reduce:
            return loss
        return loss.sum() if divisor is None else loss.sum().div_(divisor)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        """``d loss / d ce`` times the incoming gradient (a scalar, or one per row)."""
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD)
        (slope,) = ctx.saved_tensors
        return slope * grad_loss, None, None, None


def _any_ignored(target: Tensor, num_classes: int, ignore_index: int) -> bool:
    """Whether a row of ``target`` may be ``ignore_index`` (exactly, for in-range targets).

    With ``ignore_index`` outside ``[0, C)`` (the default -100) one extreme tells; inside it
    every batch counts as possibly ignored.
    """
    if ignore_index < 0:
        return int(target.min()) < 0
    if ignore_index >= num_classes:
        return int(target.max()) >= num_classes
    return True


def size_fits(logits: Tensor) -> bool:
    """Whether ``logits`` suit this path by size.

    At most :data:`SMALL_ELEMENTS` logits, or any number without a gradient: larger inputs are
    then walked in chunks (:func:`small_rows`).
    """
    numel = logits.numel()
    return numel > 0 and (numel <= SMALL_ELEMENTS or not needs_gradient(logits))


def _takes_cross_entropy(logits: Tensor, alpha: float, weight: Tensor | None) -> bool:
    """Whether a call may take :func:`_by_cross_entropy` (see its bounds)."""
    num_classes = logits.shape[-1]
    # Above SMALL_ELEMENTS the chunked statistics hold no full-size temporary, where
    # cross-entropy writes its whole log-softmax.
    if needs_gradient(logits):
        if not CROSS_ENTROPY_GRADIENT or logits.numel() > CROSS_ENTROPY_GRADIENT_MAX_ELEMENTS:
            return False
    elif logits.numel() > SMALL_ELEMENTS:
        return False
    return (
        weight is None
        and alpha >= CROSS_ENTROPY_MIN_ALPHA
        and num_classes <= CROSS_ENTROPY_MAX_CLASSES
        and (
            not CROSS_ENTROPY_NARROW_LIMITED
            or num_classes >= 16
            or num_classes == 2
            or logits.numel() <= CROSS_ENTROPY_NARROW_ELEMENTS
        )
        and logits.dtype in (torch.float32, torch.float64)
    )


def small_call(
    logits: Tensor,
    target: Tensor,
    alpha: AlphaLike,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    validate: bool,
) -> Tensor | None:
    """The loss through the small-input kernel, or ``None`` where the general path must run.

    Arguments were checked for type and shape; this covers eager CPU calls with class-index
    targets, a scalar alpha and at most ``SMALL_ELEMENTS`` logits.
    """
    num_classes = logits.shape[-1]
    small_alpha = _small_alpha(alpha, validate)
    if small_alpha is None:
        return None
    # A reshape of logits that are rows already would still cost a view node in autograd.
    rows = logits if logits.dim() == 2 else logits.reshape(-1, num_classes)
    reduce = reduction != "none"
    if _takes_cross_entropy(logits, small_alpha, weight):
        gradient = needs_gradient(logits)
        # Read only where it matters: a mean's count, and a gradient's route (see below).
        ignored = (gradient or reduction == "mean") and _any_ignored(
            target, num_classes, ignore_index
        )
        # Cross-entropy's backward turns an ignored row of -inf into NaN, where ignored rows
        # must get exactly 0: with a gradient, such batches take the kernel.
        if not (gradient and ignored):
            loss = _by_cross_entropy(
                rows, target, small_alpha, ignore_index, reduction, validate, ignored
            )
            return loss if loss is None or reduce else loss.reshape(logits.shape[:-1])
    loss = _kernel_call(rows, target, small_alpha, weight, ignore_index, reduction, validate)
    return loss if loss is None or reduce else loss.reshape(logits.shape[:-1])


def _kernel_call(
    rows: Tensor,
    target: Tensor,
    alpha: float,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    validate: bool,
) -> Tensor | None:
    """The loss of ``(N, C)`` rows through :func:`small_rows` (reduced, or ``(N,)``)."""
    indices = _small_index(target, rows.shape[-1], ignore_index, validate)
    if indices is None:
        return None
    index, counted = indices
    reduce = reduction != "none"
    row_weight, ignored = _small_row_weight(weight, counted, index, rows.dtype, reduction)

    def kernel(grad_out: Tensor | None) -> Tensor:
        loss_rows = small_rows(rows, index, alpha, row_weight, ignored, grad_out)
        return loss_rows if reduce else loss_rows.squeeze(-1)  # a sum needs no squeeze

    return apply_fused(rows, kernel, reduce, inplace=False)
