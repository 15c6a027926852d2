"""Metrics on generated answers: VQA accuracy, Acc@IoU>=0.5 for boxes, CIDEr for captions.

Pure functions of (predictions, references). A malformed generation scores as wrong
and never raises; a malformed reference is a data error and does.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Callable, Sequence

# The standard VQA answer processor's tables (VQA / EvalAI evaluation script).
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # As in the VQA script: a mark next to a space, or inside "1,000", is deleted;
        # elsewhere it becomes a space ("red/blue" -> "red blue").
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation, number words to digits, no articles, single spaces."""
    text = _process_punctuation(str(text).lower().replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def vqa_exact_match(predictions: Sequence, references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after normalize_answer."""
    if not references:
        return 0.0
    hits = sum(isinstance(p, str) and normalize_answer(p) == normalize_answer(r)
               for p, r in zip(predictions, references))
    return hits / len(references)


def parse_box(text) -> tuple[float, float, float, float] | None:
    """The first four numbers of a free-text box ("[0.1, 0.2, 0.5, 0.6]", brackets optional)."""
    if not isinstance(text, str):
        return None
    nums = _NUMBER.findall(text)
    if len(nums) < 4:
        return None
    return tuple(float(v) for v in nums[:4])  # type: ignore[return-value]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of [x1, y1, x2, y2] boxes; an inverted or empty box has IoU 0."""
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(predictions: Sequence, references: Sequence[str], threshold: float = 0.5) -> float:
    """Fraction of predicted boxes with IoU >= threshold against the reference box."""
    if not references:
        return 0.0
    hits = 0
    for i, (p, r) in enumerate(zip(predictions, references)):
        ref = parse_box(r)
        if ref is None:
            raise ValueError(f"grounding reference {i} is not a box: {r!r}")
        pred = parse_box(p)
        hits += pred is not None and box_iou(pred, ref) >= threshold
    return hits / len(references)


# A tokenised caption that came out empty (e.g. "...") still needs one token, or
# pycocoevalcap's Cider asserts; this one matches no reference n-gram.
EMPTY_CAPTION = "<empty>"


@contextlib.contextmanager
def _quiet_stderr():
    """Sends file descriptor 2 (inherited by the Java subprocess) to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cider(predictions: Sequence, references: Sequence) -> float:
    """Corpus CIDEr (pycocoevalcap's Cider over its PTB tokenizer, which runs Java).

    references: one string or a list of strings per prediction. pycocoevalcap's
    scale: a perfect match on a varied corpus scores well above 1 (tables show x100).
    """
    if not references:
        return 0.0
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": c} for c in ([r] if isinstance(r, str) else list(r))] for i, r in enumerate(references)}
    res = {i: [{"caption": p if isinstance(p, str) and p.strip() else EMPTY_CAPTION}]
           for i, p in enumerate(predictions)}
    tok = PTBTokenizer()
    with _quiet_stderr():  # the Java tokenizer reports token rates on every call
        gts_t, res_t = tok.tokenize(gts), tok.tokenize(res)
    res_t = {i: [c if c.strip() else EMPTY_CAPTION for c in caps] for i, caps in res_t.items()}
    score, _ = Cider().compute_score(gts_t, res_t)
    return float(score)


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "vqa_accuracy": vqa_exact_match,
    "iou@0.5": grounding_accuracy,
    "cider": cider,
}


def score(metric: str, predictions: Sequence, references: Sequence) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {sorted(METRICS)}")
    return METRICS[metric](predictions, references)
