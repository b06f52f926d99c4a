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

IMPLEMENTATIONS = ("fused", "fused-chunked", "fused-chunked-base2", "reference")


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every core test runs on each kernel.

    The fused path's small-input kernel (what small shapes get), its chunked kernel (forced for
    small shapes too; forward passes without a gradient take its statistics with the small
    path's per-row part, as large inputs do) as this CPU runs it (by softmax) and by the
    exponent route in base 2 (what GPUs run), and the pure formulation.
    """
    if request.param.startswith("fused-chunked"):
        from label_relaxation._impl import closed_form as _closed_form
        from label_relaxation._impl import fused as _fused
        from label_relaxation._impl import small as _small

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
