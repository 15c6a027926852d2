"""Metrics on generated answers: VQA accuracy, Acc@IoU>=0.5 for boxes, CIDEr for captions,
multiple-choice accuracy (ScienceQA option letters).

Pure functions of (predictions, references), each in its natural scale (accuracies in
[0, 1], CIDEr as pycocoevalcap reports it); tables multiply by 100. A malformed
generation scores as wrong and never raises; a malformed reference, or predictions and
references of different lengths, is a data or caller error and raises ValueError.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from typing import Callable, Sequence

# The standard VQA answer processor's tables (VQA / EvalAI evaluation script).
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]
# Copied as written from the VQA script, whose "(?!<=\d)" is a no-op lookahead (not a
# lookbehind): a period is dropped unless a digit follows, so "0.5" keeps it and "5." loses it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")

# A whole number: "0.5", ".5", "3", "-0.1". The lookarounds stop a match from starting or
# ending inside digits (else "0.3" could split into "0." and "3" to fill a box), and make
# a minus glued to a digit ("0.1-0.2") a range dash, not a sign.
_NUM = r"(?<![\d.])-?(?:\d+(?:\.\d*)?|\.\d+)(?!\d)"
_NUMBER = re.compile(_NUM)
# "[x1, y1, x2, y2]" with any spacing, commas optional; preferred over the first four
# numbers anywhere, so that "object 2 is at [..]" does not start the box at 2.
_BRACKET_BOX = re.compile(r"\[\s*" + r"\s*,?\s*".join([f"({_NUM})"] * 4) + r"\s*\]")


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # As in the VQA script: a mark next to a space, or any mark in a text holding
        # "1,000", is deleted; elsewhere it becomes a space ("red/blue" -> "red blue").
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(text: str) -> str:
    """Lower case, VQA punctuation rules, number words to digits, no articles, single spaces."""
    if not isinstance(text, str):
        # str(None) would be "none", which normalises to "0" and could match.
        raise TypeError(f"normalize_answer expects str, got {type(text).__name__}")
    text = _process_punctuation(" ".join(text.lower().split()))
    return " ".join(NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES)


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    # zip() would silently drop the tail of the longer list and skew the fraction.
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def vqa_exact_match(predictions: Sequence, references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after normalize_answer."""
    _check_lengths(predictions, references)
    if len(references) == 0:
        return 0.0
    hits = 0
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(r, str):
            raise ValueError(f"vqa reference {i} is not a string: {r!r}")
        hits += isinstance(p, str) and normalize_answer(p) == normalize_answer(r)
    return hits / len(references)


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first "[x1, y1, x2, y2]" in free text, else its first four numbers; None if fewer.

    The box is returned as written: an inverted one is not reordered (box_iou scores it 0).
    """
    if not isinstance(text, str):
        return None
    bracketed = _BRACKET_BOX.search(text)
    nums = list(bracketed.groups()) if bracketed else _NUMBER.findall(text)[:4]
    if len(nums) < 4:
        return None
    x1, y1, x2, y2 = (float(v) for v in nums)
    return x1, y1, x2, y2


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of [x1, y1, x2, y2] boxes; an inverted or zero-area box has IoU 0."""
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    # Both areas are > 0 here, so union > 0; the guard only covers float underflow.
    return inter / union if union > 0 else 0.0


def grounding_accuracy(predictions: Sequence, references: Sequence[str], threshold: float = 0.5) -> float:
    """Fraction of predicted boxes with IoU >= threshold against the reference box."""
    _check_lengths(predictions, references)
    if len(references) == 0:
        return 0.0
    hits = 0
    for i, (p, r) in enumerate(zip(predictions, references)):
        ref = parse_box(r)
        if ref is None:
            raise ValueError(f"grounding reference {i} is not a box: {r!r}")
        pred = parse_box(p)
        hits += pred is not None and box_iou(pred, ref) >= threshold
    return hits / len(references)


# Multiple choice (ScienceQA): the references are option letters. ScienceQA has at most
# five choices, so A-E are the letters a prediction may name.
MC_LETTERS = "ABCDE"
# The whole answer is one letter, maybe bracketed or followed by punctuation: "B", "b.", "(B)".
_MC_ALONE = re.compile(r"^\W*([A-Za-z])\W*$")
# The answer starts with an option marker: "b) dog", "B. dog", "(C) dog", "D: dog".
_MC_LEADING = re.compile(r"^\s*\(?([A-Za-z])\s*[).:]")
# "The answer is B", "answer: (c)", "Option D", "choice E". A bare lower-case letter is
# not taken ("the answer is a dog" names no option), a bracketed one is.
_MC_PHRASE = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is\s*)?:?\s*(?:\(([A-Za-z])\)|([A-Z])(?![\w']))")
# A standalone capital letter anywhere; lower case is left out here so that the article
# "a" in running text does not read as option A.
_MC_STANDALONE = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")


def parse_choice(text, letters: str = MC_LETTERS) -> str | None:
    """The option letter a free-text answer names, or None.

    Tried in order, the first rule giving a letter in `letters` wins: the whole text is
    one letter ("B", "(b)", "B."); the text starts with an option marker ("b) dog",
    "B. dog"); a phrase "answer is X" / "option X"; else the first standalone capital
    letter that is a valid option, so a hedge "A or B" reads as A (the first one named)
    and "I think C" as C ("I" is no option). A sentence opening with the article "A"
    therefore reads as option A; the prompt asks for the letter alone, which keeps that
    rare. Letters outside `letters` ("F") are never an answer.
    """
    if not isinstance(text, str):
        return None
    for pattern in (_MC_ALONE, _MC_LEADING):
        m = pattern.match(text)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    for m in _MC_PHRASE.finditer(text):
        letter = (m.group(1) or m.group(2)).upper()
        if letter in letters:
            return letter
    for m in _MC_STANDALONE.finditer(text):
        if m.group(1) in letters:
            return m.group(1)
    return None


def mc_accuracy(predictions: Sequence, references: Sequence[str]) -> float:
    """Fraction of predictions naming their reference option letter (see parse_choice).

    A prediction naming no valid letter is wrong (LLaVA's ScienceQA script would draw a
    random option instead; a metric here must be deterministic).
    """
    _check_lengths(predictions, references)
    if len(references) == 0:
        return 0.0
    hits = 0
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(r, str) or len(r.strip()) != 1 or r.strip().upper() not in MC_LETTERS:
            raise ValueError(f"multiple-choice reference {i} is not an option letter {list(MC_LETTERS)}: {r!r}")
        hits += parse_choice(p) == r.strip().upper()
    return hits / len(references)


# Hypothesis that came out empty after PTB tokenisation ("", "...", None). pycocoevalcap
# gives "" a 0 today, but Cider asserts on hypotheses it cannot pair, so an empty one gets
# this token instead. PTB is run with -lowerCase, so an upper-case token matches no
# reference n-gram and the item scores exactly 0.
EMPTY_CAPTION = "EMPTYCAPTION"


@contextlib.contextmanager
def _quiet_stderr():
    """Points file descriptor 2 (which the Java child inherits) at /dev/null meanwhile.

    PTBTokenizer gives Java no stderr of its own, and Java prints a token-rate line on
    every call, i.e. once per client per evaluation.
    """
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


def _one_line(text: str) -> str:
    # PTBTokenizer writes one caption per line and pairs output lines back by position;
    # Java also breaks lines at \r, \v, \f, U+2028 ..., which would shift every later
    # caption onto the wrong image. str.split() splits on all of those.
    return " ".join(text.split())


def cider(predictions: Sequence, references: Sequence) -> float:
    """Corpus CIDEr (pycocoevalcap's Cider, i.e. CIDEr-D, over its PTB tokenizer, which runs Java).

    references: one string or a list of strings per prediction. pycocoevalcap's scale:
    a perfect match on a varied corpus scores up to 10. Document frequencies come from
    the references of the corpus itself, so a one-item corpus always scores 0.
    """
    _check_lengths(predictions, references)
    if len(references) == 0:
        return 0.0
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if shutil.which("java") is None:
        raise RuntimeError("CIDEr needs `java` on PATH: pycocoevalcap's PTB tokenizer is a Java program")
    captions: dict[tuple[str, int], list[dict[str, str]]] = {}
    for i, (p, r) in enumerate(zip(predictions, references)):
        refs = [r] if isinstance(r, str) else list(r)
        if not refs or not all(isinstance(c, str) for c in refs):
            raise ValueError(f"caption reference {i} is not a string or a non-empty list of strings: {r!r}")
        captions[("ref", i)] = [{"caption": _one_line(c)} for c in refs]
        captions[("hyp", i)] = [{"caption": _one_line(p) if isinstance(p, str) else ""}]
    with _quiet_stderr():
        tokens = PTBTokenizer().tokenize(captions)  # one Java start for both sides
    n = len(references)
    gts = {i: tokens[("ref", i)] for i in range(n)}
    res = {i: [tokens[("hyp", i)][0] or EMPTY_CAPTION] for i in range(n)}
    corpus_score, _ = Cider().compute_score(gts, res)
    return float(corpus_score)


# Metrics that score a prediction against every reference of its item.
MULTI_REFERENCE = {"cider"}

METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "vqa_accuracy": vqa_exact_match,
    "iou@0.5": grounding_accuracy,
    "cider": cider,
    "mc_accuracy": mc_accuracy,
}


def score(task_metric: str, predictions: Sequence, references: Sequence) -> float:
    """The metric named task_metric (a key of METRICS) of predictions against references."""
    if task_metric not in METRICS:
        raise ValueError(f"unknown metric {task_metric!r}; valid metrics: {sorted(METRICS)}")
    return METRICS[task_metric](predictions, references)
