"""A tiny Hugging Face causal language model trained with four losses (docs/language-models.md).

    THP_MEM_ALLOC_ENABLE=1 uv run python bench/lm_training.py            # the docs' figures
    uv run python bench/lm_training.py --preset tiny                     # seconds

A ``LlamaForCausalLM`` built from a small config with random weights (no download) learns a
synthetic corpus (a noisy Markov chain over 256 token ids) with plain AdamW steps:

* ``hf-cross-entropy``: the model's own loss, ``model(input_ids, labels=labels).loss``;
* ``torch-chunked``: PyTorch's chunked ``F.linear_cross_entropy`` on the final hidden states
  and ``lm_head.weight``;
* ``lr-unfused``: ``label_relaxation_loss`` on the model's logits;
* ``lr-fused``: ``linear_label_relaxation_loss`` on the final hidden states and
  ``lm_head.weight``: the logits of the batch never exist.

A plain loop rather than ``Trainer(compute_loss_func=...)``: ``Trainer`` calls the model, which
computes the full logits, before it hands the outputs to ``compute_loss_func``, so the memory
the fused loss saves would already be spent. The fused losses call the decoder
(``model.model``) and the output layer's weight directly instead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from label_relaxation import label_relaxation_loss, linear_label_relaxation_loss
from label_relaxation.tools.benchmark import peak_allocated_bytes

VARIANTS = ("hf-cross-entropy", "torch-chunked", "lr-unfused", "lr-fused")


@dataclass(frozen=True)
class Preset:
    vocab: int
    hidden: int
    layers: int
    heads: int
    batch: int
    seq: int
    steps: int
    lr: float = 3e-3
    alpha: float = 0.1


PRESETS = {
    "docs": Preset(vocab=32000, hidden=256, layers=2, heads=4, batch=8, seq=256, steps=30),
    "tiny": Preset(vocab=512, hidden=32, layers=1, heads=4, batch=4, seq=16, steps=25),
}


def build_model(preset: Preset, seed: int = 0) -> LlamaForCausalLM:
    """A small Llama with random weights and untied embeddings."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=preset.vocab,
        hidden_size=preset.hidden,
        intermediate_size=2 * preset.hidden,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads,
        max_position_embeddings=preset.seq,
    )
    return LlamaForCausalLM(config)


CORPUS_TOKENS = 256


def corpus(preset: Preset, batches: int, seed: int = 1) -> list[Tensor]:
    """Batches of a noisy Markov chain over the first 256 token ids.

    The next token is ``(7·t + 3) mod 256`` 90% of the time and a random one of the 256
    otherwise: a model first learns which tokens occur at all (the loss falls fast from
    ``log V``), then the chain.
    """
    generator = torch.Generator().manual_seed(seed)
    used = min(CORPUS_TOKENS, preset.vocab)
    out = []
    for _ in range(batches):
        tokens = torch.empty(preset.batch, preset.seq, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, used, (preset.batch,), generator=generator)
        for position in range(1, preset.seq):
            follow = (7 * tokens[:, position - 1] + 3) % used
            noise = torch.randint(0, used, (preset.batch,), generator=generator)
            keep = torch.rand(preset.batch, generator=generator) < 0.9
            tokens[:, position] = torch.where(keep, follow, noise)
        out.append(tokens)
    return out


def loss_function(variant: str, alpha: float) -> Callable[[LlamaForCausalLM, Tensor], Tensor]:
    """``(model, tokens) -> loss`` of a variant: next-token prediction, labels = tokens."""

    def hidden_and_labels(model: LlamaForCausalLM, tokens: Tensor) -> tuple[Tensor, Tensor]:
        hidden = model.model(input_ids=tokens).last_hidden_state
        return hidden[:, :-1], tokens[:, 1:]

    def hf(model: LlamaForCausalLM, tokens: Tensor) -> Tensor:
        return model(input_ids=tokens, labels=tokens).loss  # type: ignore[no-any-return]

    def chunked(model: LlamaForCausalLM, tokens: Tensor) -> Tensor:
        hidden, labels = hidden_and_labels(model, tokens)
        return F.linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            model.lm_head.weight,
            labels.reshape(-1),
            options=torch.nn.LinearCrossEntropyOptions(),
        )

    def unfused(model: LlamaForCausalLM, tokens: Tensor) -> Tensor:
        logits = model(input_ids=tokens).logits
        return label_relaxation_loss(logits[:, :-1], tokens[:, 1:], alpha)

    def fused(model: LlamaForCausalLM, tokens: Tensor) -> Tensor:
        hidden, labels = hidden_and_labels(model, tokens)
        return linear_label_relaxation_loss(hidden, model.lm_head.weight, labels, alpha)

    variants = {"hf-cross-entropy": hf, "torch-chunked": chunked, "lr-unfused": unfused}
    variants["lr-fused"] = fused
    return variants[variant]


@dataclass
class Run:
    variant: str
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None


def train(variant: str, preset: Preset, measure_memory: bool = True) -> Run:
    """Train a fresh model (same initial weights for every variant) for ``preset.steps`` steps."""
    model = build_model(preset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.lr)
    compute = loss_function(variant, preset.alpha)
    run = Run(variant)
    for step, tokens in enumerate(corpus(preset, preset.steps)):
        optimizer.zero_grad(set_to_none=True)
        begin = time.perf_counter()
        loss = compute(model, tokens)
        loss.backward()
        optimizer.step()
        run.seconds.append(time.perf_counter() - begin)
        run.losses.append(loss.item())
        if measure_memory and step == 1:
            # The forward and backward of one more batch, gradients freed first: the step's
            # activations and loss, the part the losses differ in.
            optimizer.zero_grad(set_to_none=True)
            run.peak_bytes = peak_allocated_bytes(
                lambda batch=tokens: compute(model, batch).backward(),  # type: ignore[misc]
                tokens.device,
            )
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="docs")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    runs = [train(variant, preset) for variant in VARIANTS]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; LlamaForCausalLM "
        f"{preset.layers} layers, hidden {preset.hidden}, vocab {preset.vocab}; batch "
        f"{preset.batch} x {preset.seq} tokens; AdamW lr {preset.lr}; {preset.steps} steps; "
        f"alpha {preset.alpha}"
    )
    print("| loss | first step | last step | median step time | peak fwd+bwd memory |")
    print("|---|---:|---:|---:|---:|")
    for run in runs:
        # Steps after the first two: the first ones allocate fresh memory.
        median = statistics.median(run.seconds[2:]) if len(run.seconds) > 2 else run.seconds[-1]
        peak = "n/a" if run.peak_bytes is None else f"{run.peak_bytes / 2**20:.0f} MiB"
        print(
            f"| {run.variant} | {run.losses[0]:.3f} | {run.losses[-1]:.3f} | "
            f"{median * 1e3:.0f} ms | {peak} |"
        )


if __name__ == "__main__":
    main()
