"""Safety rules for the in-place mode, which overwrites the logits with their gradient.

Overwriting is safe only when nothing reads the logits' values afterwards. The rules:

* a leaf that requires grad, or a view of one, is refused: its values are the caller's
  parameters or inputs;
* logits that their producing autograd node saved for its own backward (``exp``, ``sigmoid``,
  ``softmax``, ``relu``, ...) are refused, also through views, because that node's gradient
  would be computed from the overwritten values;
* logits without ``requires_grad`` are never overwritten (no gradient is written at all).

Any other autograd node that saved the logits (a second loss on the same logits, say) is
caught by PyTorch's version counter: the overwrite bumps it, and that node's backward raises
"one of the variables needed for gradient computation has been modified by an inplace
operation". Values read outside autograd after the call (accuracy from the same logits) cannot
be detected; the documentation says the logits hold the gradient afterwards.
"""

from __future__ import annotations

from torch import Tensor


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors use the same storage (a view of ``b`` counts)."""
    try:
        return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
    except RuntimeError:  # tensors without storage (e.g. subclasses) cannot be told apart
        return True


def _saved_tensors(node: object) -> list[Tensor]:
    """Tensors an autograd node saved for its backward (its ``_saved_*`` attributes)."""
    saved: list[Tensor] = []
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            value = getattr(node, name)
        except RuntimeError:  # already freed by a previous backward
            continue
        candidates = value if isinstance(value, (tuple, list)) else (value,)
        saved.extend(item for item in candidates if isinstance(item, Tensor))
    return saved


def check_inplace_allowed(logits: Tensor) -> None:
    """Raise ``ValueError`` if writing the gradient into ``logits`` could corrupt anything."""
    tensor: Tensor | None = logits
    while tensor is not None:
        if tensor.is_leaf and tensor.requires_grad:
            raise ValueError(
                "inplace=True cannot overwrite logits that are (a view of) a leaf tensor "
                "requiring grad: their values are an input or parameter of yours; pass "
                "inplace=False"
            )
        node = tensor.grad_fn
        if node is not None:
            for saved in _saved_tensors(node):
                if _shares_memory(saved, logits):
                    raise ValueError(
                        f"inplace=True cannot overwrite these logits: {node.name()} saved them "
                        f"for its own backward, which would then read the gradient instead; "
                        f"pass inplace=False"
                    )
        tensor = tensor._base
