"""Activation checkpointing of the LLM's decoder layers for one local round
(`train.gradient_checkpointing`).

Why: one LLaVA-7B-width decoder layer with LoRA r 64 keeps about 296 MiB of saved
activations per sample at 680 tokens (measured); 32 layers x batch 16 is ~150 GB. With
checkpointing each layer keeps only its input and recomputes the rest in the backward.

Non-reentrant (torch.utils.checkpoint with use_reentrant=False): the reentrant variant
backpropagates into a segment only if one of its *inputs* requires grad, and with a
frozen base + peft the embeddings' output does not (the connector's image features do,
but the text positions' do not), so LoRA would silently get no gradient. The
non-reentrant one follows the autograd graph through the segment's parameters, so
every LoRA weight inside it gets its gradient; tests/unit/test_train_options.py checks
that they equal the gradients without checkpointing. The RNG state is stashed and
restored for the recompute (preserve_rng_state), so LoRA dropout draws the same masks.

Only the language model: the vision tower is frozen with inputs that need no grad, so
it saves nothing for the backward anyway, and the connector is small.
"""

from __future__ import annotations

import contextlib

import torch

from pilot_hpc.model import families


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The LLM (a transformers PreTrainedModel) inside a vision-language model of a
    supported family, peft-wrapped or not: where it sits is the family's (model/families)."""
    base = families.unwrap(model)
    try:
        llm = families.of_model(base).language_model(base)
    except (ValueError, AttributeError):
        llm = None
    if llm is None or not hasattr(llm, "activation_checkpointing_enable"):
        raise ValueError(f"train.gradient_checkpointing: no language model found in {type(base).__name__} "
                         "(not a model of a supported family: pilot_hpc.model.families); set "
                         "train.gradient_checkpointing=false")
    return llm


@contextlib.contextmanager
def checkpointing(model: torch.nn.Module, on: bool):
    """Checkpointing on for the body (when `on`), and off again after it: the model is
    shared with evaluation and with rounds whose spec may say otherwise."""
    if not on:
        yield
        return
    llm = language_model(model)
    llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        llm.activation_checkpointing_disable()
