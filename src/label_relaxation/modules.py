"""``nn.Module`` wrappers: they store the loss's arguments and delegate to the functions."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from label_relaxation._impl import validation as check
from label_relaxation._impl.validation import Reduction
from label_relaxation.functional import Implementation, label_relaxation_loss
from label_relaxation.linear import linear_label_relaxation_loss
from label_relaxation.soft import mixup_label_relaxation_loss, soft_label_relaxation_loss


class _RelaxationModule(nn.Module):
    """Shared state of the criteria: alpha in a float64 buffer, optional class weights.

    The buffer has shape ``(1,)`` and each call passes a 0-d view of it: a 0-d float64 tensor
    as a compiled graph's input makes Dynamo (torch 2.15) create a float symbol for its value
    and then restart its whole analysis once inside the first compile.
    """

    alpha_buffer: Tensor
    weight: Tensor | None

    def __init__(self, alpha: float, weight: Tensor | None, reduction: Reduction) -> None:
        super().__init__()
        check.check_alpha_float(alpha)
        check.check_reduction(reduction)
        if weight is not None and (weight.dim() != 1 or not weight.is_floating_point()):
            raise ValueError(
                f"weight must be a floating tensor of shape (C,), got dtype {weight.dtype} "
                f"and shape {tuple(weight.shape)}"
            )
        self._alpha_value = float(alpha)
        # Not persistent: alpha is a hyperparameter, and a state_dict stays loadable into a
        # criterion built with another alpha (nn.CrossEntropyLoss has weight alone).
        self.register_buffer("alpha_buffer", self._new_alpha_buffer(None), persistent=False)
        self.register_buffer("weight", weight)
        self.reduction: Reduction = reduction

    @property
    def alpha(self) -> float:
        """The relaxation in (0, 1); assigning it updates the buffer in place."""
        return self._alpha_value

    @alpha.setter
    def alpha(self, value: float) -> None:
        check.check_alpha_float(value)
        self._alpha_value = float(value)
        with torch.no_grad():
            self.alpha_buffer.fill_(self._alpha_value)

    @property
    def _alpha_argument(self) -> float | Tensor:
        """What a call passes as alpha.

        The 0-d view of the buffer while ``torch.compile`` traces (a new value is then a new
        input, not a recompile), else the Python float, which an eager call reads for free.
        """
        if torch.compiler.is_compiling():
            return self.alpha_buffer[0]
        return self._alpha_value

    @property
    def _weight_argument(self) -> Tensor | None:
        """The class weights a call passes: in eager mode read from the buffer table directly.

        ``self.weight`` is found by ``nn.Module.__getattr__`` only after the ordinary lookup has
        failed, which raises and catches an ``AttributeError`` inside CPython on every call:
        1.0 against 0.3 µs for this property (2-core AMD EPYC, torch 2.15). ``torch.compile``
        traces the attribute it knows.
        """
        if torch.compiler.is_compiling():
            return self.weight
        return self._buffers["weight"]

    def _new_alpha_buffer(self, device: torch.device | None) -> Tensor:
        return torch.full((1,), self._alpha_value, dtype=torch.float64, device=device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> _RelaxationModule:
        # Module.half() and friends cast every floating buffer; alpha keeps float64 so that
        # 0.1 stays 0.1, and only follows device moves.
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if self.alpha_buffer.dtype != torch.float64:
            self.alpha_buffer = self._new_alpha_buffer(self.alpha_buffer.device)
        return self

    def extra_repr(self) -> str:
        """Show alpha and reduction."""
        return f"alpha={self._alpha_value!r}, reduction={self.reduction!r}"


class LabelRelaxationLoss(_RelaxationModule):
    """Criterion computing :func:`~label_relaxation.label_relaxation_loss`.

    A drop-in for ``nn.CrossEntropyLoss`` with the class dimension last. ``alpha`` lives in a
    one-element float64 buffer: assigning ``criterion.alpha = value`` (a schedule) updates the
    buffer in place, so a compiled model that calls the criterion never recompiles for a new
    alpha.
    ``weight`` is a buffer too: it follows ``.to()`` and is part of the ``state_dict``.

    Args:
        alpha: Relaxation in the open interval (0, 1).
        weight: Optional class weights of shape ``(C,)``.
        ignore_index: Index targets equal to this value contribute no loss and no gradient.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        inplace: Write the gradient into the logits' storage (see the function).
        implementation: ``"auto"``, ``"fused"`` or ``"reference"`` (see the function).

    Raises:
        ValueError: ``alpha`` outside (0, 1), or an unknown ``reduction``.
        TypeError: ``alpha`` is not a number or ``weight`` not a floating tensor.

    Shape:
        - input: ``(..., C)`` logits.
        - target: ``(...)`` class indices or ``(..., C)`` one-hot.
        - output: ``()``, or ``(...)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from label_relaxation import LabelRelaxationLoss
        >>> criterion = LabelRelaxationLoss(alpha=0.1, ignore_index=-100)
        >>> logits = torch.randn(2, 5, 11, requires_grad=True)  # (batch, seq, vocab)
        >>> target = torch.randint(0, 11, (2, 5))
        >>> criterion(logits, target).backward()
        >>> criterion.alpha = 0.05  # schedules change alpha without recompiling
        >>> criterion
        LabelRelaxationLoss(alpha=0.05, reduction='mean')
    """

    def __init__(
        self,
        alpha: float = 0.1,
        *,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        inplace: bool = False,
        implementation: Implementation = "auto",
    ) -> None:
        super().__init__(alpha, weight, reduction)
        self.ignore_index = ignore_index
        self.inplace = inplace
        self.implementation: Implementation = implementation

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss of logits ``input`` ``(..., C)`` against ``target``."""
        return label_relaxation_loss(
            input,
            target,
            self._alpha_argument,
            weight=self._weight_argument,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            inplace=self.inplace,
            implementation=self.implementation,
        )

    def extra_repr(self) -> str:
        """Show alpha and reduction (and ignore_index when it is not the default)."""
        parts = [super().extra_repr()]
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        if self.inplace:
            parts.append("inplace=True")
        return ", ".join(parts)


class SoftLabelRelaxationLoss(_RelaxationModule):
    """Criterion computing :func:`~label_relaxation.soft_label_relaxation_loss`.

    Args:
        alpha: Relaxation in the open interval (0, 1), held as in :class:`LabelRelaxationLoss`.
        weight: Optional class weights ``(C,)``; a row is weighted by ``Σ_k weight_k·t_k``.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Raises:
        ValueError: ``alpha`` outside (0, 1), or an unknown ``reduction``.

    Shape:
        - input, target: ``(..., C)``.
        - output: ``()``, or ``(...)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from label_relaxation import SoftLabelRelaxationLoss
        >>> criterion = SoftLabelRelaxationLoss(alpha=0.1)
        >>> target = torch.softmax(torch.randn(4, 6), -1)  # e.g. a teacher's distribution
        >>> criterion(torch.randn(4, 6), target).shape
        torch.Size([])
    """

    def __init__(
        self, alpha: float = 0.1, *, weight: Tensor | None = None, reduction: Reduction = "mean"
    ) -> None:
        super().__init__(alpha, weight, reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss of logits ``input`` against target distributions ``target``."""
        return soft_label_relaxation_loss(
            input,
            target,
            self._alpha_argument,
            weight=self._weight_argument,
            reduction=self.reduction,
        )


class MixupLabelRelaxationLoss(_RelaxationModule):
    """Criterion computing :func:`~label_relaxation.mixup_label_relaxation_loss`.

    Args:
        alpha: Relaxation in the open interval (0, 1), held as in :class:`LabelRelaxationLoss`.
        weight: Optional class weights ``(C,)``.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Raises:
        ValueError: ``alpha`` outside (0, 1), or an unknown ``reduction``.

    Shape:
        - input: ``(..., C)``; target_a, target_b: ``(...)``; lam: scalar or ``(...)``.
        - output: ``()``, or ``(...)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from label_relaxation import MixupLabelRelaxationLoss
        >>> criterion = MixupLabelRelaxationLoss(alpha=0.1)
        >>> logits = torch.randn(4, 6)
        >>> a, b = torch.randint(0, 6, (4,)), torch.randint(0, 6, (4,))
        >>> criterion(logits, a, b, 0.7).shape
        torch.Size([])
    """

    def __init__(
        self, alpha: float = 0.1, *, weight: Tensor | None = None, reduction: Reduction = "mean"
    ) -> None:
        super().__init__(alpha, weight, reduction)

    def forward(
        self, input: Tensor, target_a: Tensor, target_b: Tensor, lam: float | Tensor
    ) -> Tensor:
        """Compute the loss of logits ``input`` against ``lam·e_a + (1-lam)·e_b``."""
        return mixup_label_relaxation_loss(
            input,
            target_a,
            target_b,
            lam,
            self._alpha_argument,
            weight=self._weight_argument,
            reduction=self.reduction,
        )


class LinearLabelRelaxationLoss(_RelaxationModule):
    """Output layer and criterion in one: :func:`~label_relaxation.linear_label_relaxation_loss`.

    Mirrors ``nn.LinearCrossEntropyLoss`` (torch 2.15): it owns the output layer as
    ``self.linear`` (an ``nn.Linear(in_features, num_classes)``) and computes the loss of its
    logits against ``target`` without ever holding all of them. ``alpha`` schedules as in
    :class:`LabelRelaxationLoss`, without recompiling a compiled model.

    Args:
        in_features: Size ``H`` of each input's last dimension.
        num_classes: Number of classes ``V`` (the vocabulary of a language model).
        alpha: Relaxation in the open interval (0, 1).
        bias: Whether the output layer has a bias.
        device: Device of the output layer's parameters.
        dtype: Dtype of the output layer's parameters.
        weight: Optional class weights of shape ``(V,)``.
        ignore_index: Targets equal to this value contribute no loss and no gradient.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        chunk_size: Rows of logits per block (see the function).

    Raises:
        ValueError: ``alpha`` outside (0, 1), or an unknown ``reduction``.
        TypeError: ``alpha`` is not a number or ``weight`` not a floating tensor.

    Shape:
        - input: ``(..., H)``.
        - target: ``(...)`` class indices.
        - output: ``()``, or ``(...)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from label_relaxation import LinearLabelRelaxationLoss
        >>> head = LinearLabelRelaxationLoss(16, 100, alpha=0.1)
        >>> hidden = torch.randn(2, 5, 16)
        >>> target = torch.randint(0, 100, (2, 5))
        >>> head(hidden, target).backward()
        >>> head.linear.weight.grad.shape
        torch.Size([100, 16])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        alpha: float = 0.1,
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(alpha, weight, reduction)
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss of ``self.linear(input)`` against ``target``."""
        return linear_label_relaxation_loss(
            input,
            self.linear.weight,
            target,
            self._alpha_argument,
            linear_bias=self.linear.bias,
            weight=self._weight_argument,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
        )
