"""Why rows of few classes cost what they cost: ATen's operations along a short last dimension.

Run from the repository root: ``THP_MEM_ALLOC_ENABLE=1 uv run python bench/narrow_rows.py``.
For float32 logits of 4096x10 and 65536x10 (no gradient), prints ``torch.utils.benchmark``
medians of

* cross-entropy's forward, its ``log_softmax`` alone, and the loss's forward;
* the row operations any route needs, along the rows' 10 classes as the logits lie in memory
  (``(N, C)``, the class dimension last and contiguous): the row maximum, the row sum, the
  subtraction of a per-row column;
* the same operations on the transposed layout ``(C, N)``, where they run along contiguous
  memory, and what producing that layout costs (a strided copy, or a product with the
  identity matrix, exact for finite logits only);
* an exponential over all logits, which needs no row structure.

Each operation is timed alone, so the sums are lower bounds: a route built of these calls
costs at least what its calls cost.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from profile_small import median_us  # the sibling script: run as bench/narrow_rows.py

from label_relaxation import label_relaxation_loss


def measure(rows: int, classes: int) -> list[tuple[str, float]]:
    """``(operation, µs)`` pairs at ``rows`` x ``classes``."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, classes, generator=generator) * 3
    target = torch.randint(0, classes, (rows,), generator=generator)
    transposed = logits.t().contiguous()
    names: dict[str, object] = {
        "F": F,
        "torch": torch,
        "loss": label_relaxation_loss,
        "z": logits,
        "y": target,
        "zt": transposed,
        "m": logits.amax(-1, keepdim=True),
        "mt": transposed.amax(0),
        "eye": torch.eye(classes),
    }
    statements = [
        ("cross-entropy forward", "F.cross_entropy(z, y)"),
        ("log_softmax", "torch.log_softmax(z, -1)"),
        ("label relaxation forward", "loss(z, y)"),
        ("(N, C): row maximum", "z.amax(-1)"),
        ("(N, C): row sum", "z.sum(-1)"),
        ("(N, C): minus a column", "torch.sub(z, m)"),
        ("(C, N): row maximum", "zt.amax(0)"),
        ("(C, N): row sum", "zt.sum(0)"),
        ("(C, N): minus a row", "torch.sub(zt, mt)"),
        ("(N, C) to (C, N): strided copy", "z.t().contiguous()"),
        ("(N, C) to (C, N): identity product", "torch.mm(eye, z.t())"),
        ("exp2 of every logit", "z.exp2()"),
    ]
    with torch.no_grad():
        return [(name, median_us(statement, 0.3, **names)) for name, statement in statements]


def main() -> None:
    """Print one table per shape."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x10,65536x10")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, no gradient")
    for shape in args.shapes.split(","):
        rows, classes = (int(part) for part in shape.split("x"))
        results = measure(rows, classes)
        reference = results[0][1]
        print(f"\n{shape}")
        for name, micros in results:
            print(f"  {name:38s} {micros:9.1f} µs  {micros / reference:5.2f}x")


if __name__ == "__main__":
    main()
