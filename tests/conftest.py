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

IMPLEMENTATIONS = ("fused", "fused-chunked", "reference")


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every core test runs on each kernel.

    The fused path's small-input kernel (what small shapes get), its chunked kernel (forced for
    small shapes too), and the pure formulation.
    """
    if request.param == "fused-chunked":
        from label_relaxation import _small

        monkeypatch.setattr(_small, "SMALL_ELEMENTS", 0)
        return "fused"
    return str(request.param)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
