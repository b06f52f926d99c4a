"""A real client: a tiny Hugging Face Llama trained with the fused loss (bench/lm_training.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from bench.lm_training import Preset, train

# Vocabulary large enough that the logits (4 x 16 x 4096 floats, 1 MiB) dominate the step's
# activations, so the fused loss's saving shows in the allocator's peak.
PRESET = Preset(vocab=4096, hidden=32, layers=1, heads=4, batch=4, seq=16, steps=20, lr=1e-2)


@pytest.fixture(scope="module")
def runs() -> dict[str, object]:
    return {
        variant: train(variant, PRESET) for variant in ("lr-unfused", "lr-fused", "torch-chunked")
    }


def test_fused_loss_trains_the_model(runs: dict) -> None:  # type: ignore[type-arg]
    fused = runs["lr-fused"]
    assert fused.losses[-1] < fused.losses[0] - 0.5, fused.losses


def test_fused_and_unfused_training_agree(runs: dict) -> None:  # type: ignore[type-arg]
    # Same initial weights and batches: the first steps agree to float32 rounding, which the
    # optimizer then carries on.
    fused, unfused = runs["lr-fused"].losses, runs["lr-unfused"].losses
    assert fused[:5] == pytest.approx(unfused[:5], rel=1e-4)
    assert fused[-1] == pytest.approx(unfused[-1], rel=2e-2)


def test_fused_step_holds_less_memory(runs: dict) -> None:  # type: ignore[type-arg]
    fused, unfused = runs["lr-fused"].peak_bytes, runs["lr-unfused"].peak_bytes
    if fused is None or unfused is None:
        pytest.skip("the profiler recorded no allocations on this machine")
    logits_bytes = PRESET.batch * PRESET.seq * PRESET.vocab * 4
    # The unfused step holds the logits and their gradient; the fused one holds neither.
    assert unfused - fused >= logits_bytes


def test_pytorch_chunked_baseline_trains_too(runs: dict) -> None:  # type: ignore[type-arg]
    chunked = runs["torch-chunked"]
    assert chunked.losses[-1] < chunked.losses[0] - 0.5
