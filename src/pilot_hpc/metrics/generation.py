"""Greedy generation of a client's answers and their score (evaluation of one client),
and the per-sample predictions file of an evaluation."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from pilot_hpc import jsonout
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
                                tokenizer.pad_token_id, getattr(dataset, "mm_token_types", None))
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        if progress is not None:
            progress(s // batch_size + 1, -(-len(dataset) // batch_size))
    return answers


@dataclass
class Evaluation:
    """One client's evaluation: the metric, the answers, their references and per-sample
    scores (their mean is `value`; for CIDEr pycocoevalcap's per-item scores, whose mean
    is the corpus score). Unpacks as (value, predictions), the shape callers used before."""

    value: float
    predictions: list[str]
    references: list = field(default_factory=list)
    items: list[float] = field(default_factory=list)

    def __iter__(self):
        return iter((self.value, self.predictions))


def references_of(dataset: InstructionDataset, metric: str) -> list:
    if metric in scores.MULTI_REFERENCE:
        return [dataset.references(i) for i in range(len(dataset))]
    return [dataset.answer(i) for i in range(len(dataset))]


def evaluate_client(model, tokenizer, dataset: InstructionDataset, metric: str, batch_size: int,
                    max_new_tokens: int, device: torch.device,
                    progress: Callable[[int, int], None] | None = None) -> Evaluation:
    """The client's greedy answers scored under `metric` (see Evaluation); progress as in
    generate_answers."""
    predictions = generate_answers(model, tokenizer, dataset, batch_size, max_new_tokens, device, progress)
    references = references_of(dataset, metric)
    value, items = scores.score_items(metric, predictions, references)
    return Evaluation(value, predictions, references, items)


PARSERS = {"mc_accuracy": scores.parse_choice_llava, "mc_accuracy_lenient": scores.parse_choice}


def prediction_rows(dataset: InstructionDataset, ev: Evaluation, metric: str, model_id: str) -> list[dict]:
    """One row per sample: ours (id, question, prediction, reference(s), score) and the
    LLaVA answer-file fields (question_id, prompt, text, answer_id, model_id, metadata),
    so that LLaVA's and the official scorers read the file as it is."""
    rows = []
    for i, sample in enumerate(dataset.samples):
        question = sample.turns[0][0]
        ref = ev.references[i]
        rows.append({
            "id": sample.id, "question": question, "prediction": ev.predictions[i],
            "reference": ref if isinstance(ref, str) else ref[0],
            "references": dataset.references(i), "metric": metric, "score": ev.items[i],
            "question_id": sample.id, "prompt": "<image>\n" + question, "text": ev.predictions[i],
            # Deterministic, so a resumed run writes the same file as an uninterrupted one
            # (LLaVA draws a random shortuuid here).
            "answer_id": f"{model_id}/{sample.id}", "model_id": model_id,
            "metadata": {"image": sample.image_path},
        })
        if sample.subset is not None:  # data.eval_subsets: e.g. seen / unseen
            rows[-1]["subset"] = sample.subset
        if metric in PARSERS:  # the option letter the metric read (None: unparseable, scored wrong)
            rows[-1]["parsed"] = PARSERS[metric](ev.predictions[i])
    return rows


def write_predictions(path: str, rows: list[dict]) -> None:
    """JSON lines, written as <path>.tmp and renamed: a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(jsonout.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_predictions(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
