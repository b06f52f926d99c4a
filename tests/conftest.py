from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests run a few hundred small cases; the dynamo/compile tests dominate the budget.
settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

IMPLEMENTATIONS = (
    "fused",
    "fused-kernel",
    "fused-base2",
    "fused-chunked",
    "fused-chunked-base2",
    "reference",
)


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every core test runs on each kernel.

    The fused path's small inputs: by cross-entropy's autograd nodes where they serve (alpha of
    at least 0.1, up to 128 classes; an AVX2 CPU takes this route up to
    CROSS_ENTROPY_GRADIENT_MAX_ELEMENTS logits), else the small-input kernel, in base e and
    in base 2 (an AVX2 CPU from BASE_TWO_MIN_ELEMENTS logits). Its chunked kernel (forced for
    small shapes too; forward passes without a gradient take its statistics with the small
    path's per-row part, as large inputs do) as this CPU runs it (by softmax) and by the
    exponent route in base 2 (what GPUs run). And the pure formulation.
    """
    from label_relaxation._impl import closed_form as _closed_form
    from label_relaxation._impl import small as _small

    if request.param == "fused":
        monkeypatch.setattr(_small, "CROSS_ENTROPY_GRADIENT", True)
        monkeypatch.setattr(_small, "CROSS_ENTROPY_GRADIENT_MAX_ELEMENTS", _small.SMALL_ELEMENTS)
    elif request.param in ("fused-kernel", "fused-base2"):
        monkeypatch.setattr(_small, "CROSS_ENTROPY_GRADIENT", False)
        base_two = request.param == "fused-base2"
        monkeypatch.setattr(
            _closed_form, "_CPU_BASE", _closed_form.BASE_TWO if base_two else _closed_form.BASE_E
        )
        monkeypatch.setattr(_small, "BASE_TWO_MIN_ELEMENTS", 0)
        return "fused"
    if request.param.startswith("fused-chunked"):
        from label_relaxation._impl import fused as _fused

        monkeypatch.setattr(_small, "SMALL_ELEMENTS", 0)
        if request.param.endswith("base2"):
            # What GPUs run: the exponent route in base 2, not the CPU's softmax route.
            monkeypatch.setattr(_closed_form, "_CPU_BASE", _closed_form.BASE_TWO)
            monkeypatch.setattr(_fused, "SOFTMAX_ON_CPU", False)
        else:
            # The CPU's softmax route (gradients, and forward passes without one), on the
            # tests' narrow rows too.
            monkeypatch.setattr(_fused, "SOFTMAX_MIN_CLASSES", 2)
            monkeypatch.setattr(_fused, "FORWARD_SOFTMAX_MIN_CLASSES", 2)
        return "fused"
    return str(request.param)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
