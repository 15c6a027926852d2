"""The learning rate of each step of a local round (`train.lr_schedule`, `train.warmup_ratio`).

A pure function of (step, the round's total steps): a run resumed at step k sets the
same rates as the uninterrupted one without any scheduler state to checkpoint.

cosine: linear warm-up over the first ceil(warmup_ratio x total) steps, then a cosine
decay (LLaVA-1.5's fine-tuning: warm-up 3%, cosine). One difference from Hugging Face's
get_cosine_schedule_with_warmup: its first step runs at lr 0 (factor step / warmup);
here warm-up step i runs at (i + 1) / warmup, so no step of a short local round is
wasted. The decay reaches 0 only after the last step (factor at the last step:
0.5 (1 + cos(pi (d - 1) / d)) for d decay steps).
"""

from __future__ import annotations

import math


def warmup_steps(total: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total) if total > 0 else 0


def lr_factor(step: int, total: int, schedule: str, warmup_ratio: float) -> float:
    """The multiplier of the base lr for optimiser step `step` (0-based) of `total`."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"train.lr_schedule must be constant or cosine, got {schedule!r}")
    w = warmup_steps(total, warmup_ratio)
    if step < w:
        return (step + 1) / w
    decay = max(total - w, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - w, decay) / decay))


def set_lr(optimizer, base_lr: float, step: int, total: int, schedule: str, warmup_ratio: float) -> None:
    """Sets every param group's lr for step `step`; the constant schedule leaves the
    optimiser untouched (its lr is the base lr already)."""
    if schedule == "constant":
        return
    lr = base_lr * lr_factor(step, total, schedule, warmup_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
