"""Greedy generation of a client's answers and their score (evaluation of one client)."""

from __future__ import annotations

from typing import Callable

import torch

from pilot_hpc.data.records import InstructionDataset, collate_prompts
from pilot_hpc.metrics import scores


@torch.no_grad()
def generate_answers(model, tokenizer, dataset: InstructionDataset, batch_size: int, max_new_tokens: int,
                     device: torch.device, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Greedy generation of the first answer of every sample; only the new tokens are decoded.
    progress(batch, batches) after every generation batch (1-based)."""
    model.eval()
    answers: list[str] = []
    for s in range(0, len(dataset), batch_size):
        idx = range(s, min(s + batch_size, len(dataset)))
        batch = collate_prompts([dataset.encode_prompt(i) for i in idx], [dataset.pixels(i) for i in idx],
                                tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        if progress is not None:
            progress(s // batch_size + 1, -(-len(dataset) // batch_size))
    return answers


def evaluate_client(model, tokenizer, dataset: InstructionDataset, metric: str, batch_size: int,
                    max_new_tokens: int, device: torch.device,
                    progress: Callable[[int, int], None] | None = None) -> tuple[float, list[str]]:
    """(score of the client's greedy answers under `metric`, the answers)."""
    predictions = generate_answers(model, tokenizer, dataset, batch_size, max_new_tokens, device, progress)
    if metric in scores.MULTI_REFERENCE:
        references = [dataset.references(i) for i in range(len(dataset))]
    else:
        references = [dataset.answer(i) for i in range(len(dataset))]
    return scores.score(metric, predictions, references), predictions
