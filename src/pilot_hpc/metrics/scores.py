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

# VQA answer normalisation, rule for rule as EvalAI's answer processor (the one LLaVA's
# llava/eval/m4c_evaluator.py scores TextVQA/VQAv2 with), so that a verdict here is the
# verdict there. Its tables: number words, articles, punctuation marks, contractions.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]


def _contractions() -> dict[str, str]:
    """Apostrophe-less spellings -> the spelling with apostrophes, as the reference maps them.

    Built from stems rather than listed out; the reference's table holds the same pairs.
    Its entries with capitals ("Im", "Ive", "Id've") never fire (it looks words up after
    lower-casing), so they are left out here; its one reversed entry, "somebody'd" ->
    "somebodyd", is kept, since a verdict depends on it.
    """
    table: dict[str, str] = {}
    for neg in ("ain", "aren", "can", "couldn", "didn", "doesn", "don", "hadn", "hasn", "haven", "isn", "mightn",
                "mustn", "needn", "oughtn", "shan", "shouldn", "wasn", "weren", "won", "wouldn"):
        table[neg + "t"] = neg + "'t"  # dont -> don't
    for stem in ("could", "might", "must", "should", "would", "not"):
        table[stem + "ve"] = stem + "'ve"  # shouldve -> should've (and "notve")
    for stem in ("couldn", "hadn", "mightn", "shouldn", "wouldn"):
        table[stem + "t've"] = table[stem + "'tve"] = stem + "'t've"  # couldnt've, couldn'tve
    # "-'d've": both half-apostrophe spellings.
    for stem in ("he", "it", "she", "somebody", "someone", "something", "there", "they", "we", "who", "you"):
        table[stem + "d've"] = table[stem + "'dve"] = stem + "'d've"
    for spelling in ("yall'd've", "y'alld've", "y'all'dve"):
        table[spelling] = "y'all'd've"
    for word, full in {
        "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "itd": "it'd",
        "itll": "it'll", "let's": "let's", "maam": "ma'am", "oclock": "o'clock", "ow's'at": "'ow's'at",
        "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "she's": "she's", "somebody'd": "somebodyd",
        "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someonell": "someone'll",
        "someones": "someone's", "somethingd": "something'd", "somethingll": "something'll", "thats": "that's",
        "thered": "there'd", "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
        "theyre": "they're", "theyve": "they've", "twas": "'twas", "weve": "we've", "whatll": "what'll",
        "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
        "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's",
        "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "yall": "y'all",
        "yall'll": "y'all'll", "y'allll": "y'all'll", "youd": "you'd", "youll": "you'll", "youre": "you're",
        "youve": "you've",
    }.items():
        table[word] = full
    return table


CONTRACTIONS = _contractions()
# The reference's period rule: "(?!<=\d)" is a no-op lookahead (not a lookbehind), so a
# period is dropped unless a digit follows ("0.5" keeps it, "5." loses it). It passes
# re.UNICODE (= 32) as sub()'s third positional argument, which is `count`: at most 32
# periods go per answer; _PERIOD_LIMIT keeps that.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_LIMIT = 32


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # A mark next to a space is deleted, elsewhere it becomes a space ("red/blue" ->
        # "red blue"). The reference also deletes every mark of a text holding "1,000",
        # but its tokenizer has removed all commas before, so that branch never fires.
        out = out.replace(p, "") if (p + " " in text or " " + p in text) else out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_LIMIT)


def normalize_answer(text: str) -> str:
    """EvalAI's VQA answer processing, in its order: lower case; commas and "?" removed,
    "'s" split off ("man's" -> "man 's"); newlines and tabs to spaces; punctuation and
    period rules; number words to digits; articles dropped; contractions restored
    ("dont" -> "don't"); single spaces."""
    if not isinstance(text, str):
        # str(None) would be "none", which normalises to "0" and could match.
        raise TypeError(f"normalize_answer expects str, got {type(text).__name__}")
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _process_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


# A whole number: "0.5", ".5", "3", "-0.1". The lookarounds stop a match from starting or
# ending inside digits (else "0.3" could split into "0." and "3" to fill a box), make a
# minus glued to a digit ("0.1-0.2") a range dash, not a sign, and skip digits inside a
# name: the "1" of "x1=0.37" or "box2" is no coordinate.
_NUM = r"(?<![\w.])-?(?:\d+(?:\.\d*)?|\.\d+)(?!\d)"
_NUMBER = re.compile(_NUM)
# "[x1, y1, x2, y2]" with any spacing, commas optional; preferred over the first four
# numbers anywhere, so that "object 2 is at [..]" does not start the box at 2.
_BRACKET_BOX = re.compile(r"\[\s*" + r"\s*,?\s*".join([f"({_NUM})"] * 4) + r"\s*\]")


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    # zip() would silently drop the tail of the longer list and skew the fraction.
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def _mean(items: list[float]) -> float:
    return sum(items) / len(items) if items else 0.0


def vqa_items(predictions: Sequence, references: Sequence[str]) -> list[float]:
    """Per sample 1.0 when the prediction equals its reference after normalize_answer."""
    _check_lengths(predictions, references)
    out = []
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(r, str):
            raise ValueError(f"vqa reference {i} is not a string: {r!r}")
        out.append(float(isinstance(p, str) and normalize_answer(p) == normalize_answer(r)))
    return out


def vqa_exact_match(predictions: Sequence, references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after normalize_answer (one
    reference per item: EvalAI's soft score over ten answers is then exact match)."""
    return _mean(vqa_items(predictions, references))


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first "[x1, y1, x2, y2]" in free text, else its first four free-standing
    numbers (digits inside names such as "x1" or "box2" are skipped); None if fewer.

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


def grounding_items(predictions: Sequence, references: Sequence[str], threshold: float = 0.5) -> list[float]:
    """Per sample 1.0 when the predicted box has IoU >= threshold with the reference box."""
    _check_lengths(predictions, references)
    out = []
    for i, (p, r) in enumerate(zip(predictions, references)):
        ref = parse_box(r)
        if ref is None:
            raise ValueError(f"grounding reference {i} is not a box: {r!r}")
        pred = parse_box(p)
        out.append(float(pred is not None and box_iou(pred, ref) >= threshold))
    return out


def grounding_accuracy(predictions: Sequence, references: Sequence[str], threshold: float = 0.5) -> float:
    """Fraction of predicted boxes with IoU >= threshold against the reference box."""
    return _mean(grounding_items(predictions, references, threshold))


# Multiple choice (ScienceQA): the references are option letters. ScienceQA has at most
# five choices, so A-E are the letters a prediction may name.
MC_LETTERS = "ABCDE"
# LLaVA-1.5's llava/eval/eval_science_qa.py, in its order: the whole answer is a letter;
# or it starts with "<letter>. "; or "The answer is <capital>" followed by any one
# character occurs exactly once. Anything else is "FAILED" (there: a random option).
_LLAVA_PHRASE = re.compile(r"The answer is ([A-Z]).")
# The lenient parser (metric mc_accuracy_lenient):
# the whole answer is one letter, maybe bracketed or followed by punctuation: "B", "b.", "(B)".
_MC_ALONE = re.compile(r"^\W*([A-Za-z])\W*$")
# The answer starts with an option marker: "b) dog", "B. dog", "(C) dog", "D: dog".
_MC_LEADING = re.compile(r"^\s*\(?([A-Za-z])\s*[).:]")
# "The answer is B", "answer: (c)", "Option D", "option d is correct", "choice E". After
# "answer" a bare lower-case letter is not taken ("the answer is a dog" names no option),
# a bracketed one is; after "option"/"choice" a lower-case one is ("option a" is one).
_MC_PHRASE = re.compile(r"\b(?i:answer)\s*(?i:is\s*)?:?\s*(?:\(([A-Za-z])\)|([A-Z])(?![\w']))"
                        r"|\b(?i:option|choice)\s*(?i:is\s*)?:?\s*\(?([A-Za-z])\)?(?![\w'])")
# A standalone capital letter anywhere; lower case is left out here so that the article
# "a" in running text does not read as option A.
_MC_STANDALONE = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")


def parse_choice_llava(text, letters: str = MC_LETTERS) -> str | None:
    """The option letter LLaVA's ScienceQA script reads in an answer, or None where it
    reads none ("FAILED"). Strict by design: "(C)", "b", "B) cat" and "answer: (a)" name
    no option for it."""
    if not isinstance(text, str):
        return None
    if len(text) == 1 and text in letters:  # the script compares with a list of letters
        letter = text
    elif len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _LLAVA_PHRASE.findall(text)
        letter = found[0] if len(found) == 1 else None
    # The script's get_pred_idx: a letter beyond the choices ("F") is no answer either.
    return letter if letter is not None and letter in letters else None


def parse_choice(text, letters: str = MC_LETTERS) -> str | None:
    """The option letter a free-text answer names, or None (the lenient parser).

    Tried in order, the first rule giving a letter in `letters` wins: the whole text is
    one letter ("B", "(b)", "B."); the text starts with an option marker ("b) dog",
    "B. dog"); a phrase "answer is X" / "option x"; else the first standalone capital
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
        letter = next(g for g in m.groups() if g).upper()
        if letter in letters:
            return letter
    for m in _MC_STANDALONE.finditer(text):
        if m.group(1) in letters:
            return m.group(1)
    return None


def _mc_reference(i: int, r) -> str:
    if not isinstance(r, str) or len(r.strip()) != 1 or r.strip().upper() not in MC_LETTERS:
        raise ValueError(f"multiple-choice reference {i} is not an option letter {list(MC_LETTERS)}: {r!r}")
    return r.strip().upper()


def _mc_items(parser, predictions: Sequence, references: Sequence[str]) -> list[float]:
    _check_lengths(predictions, references)
    return [float(parser(p) == _mc_reference(i, r)) for i, (p, r) in enumerate(zip(predictions, references))]


def mc_items(predictions: Sequence, references: Sequence[str]) -> list[float]:
    """Per sample 1.0 when LLaVA's ScienceQA rules read the reference letter."""
    return _mc_items(parse_choice_llava, predictions, references)


def mc_lenient_items(predictions: Sequence, references: Sequence[str]) -> list[float]:
    """Per sample 1.0 when the lenient parser (parse_choice) reads the reference letter."""
    return _mc_items(parse_choice, predictions, references)


def mc_accuracy(predictions: Sequence, references: Sequence[str]) -> float:
    """ScienceQA accuracy as LLaVA's eval_science_qa.py scores it (parse_choice_llava),
    except for answers it cannot parse: the script draws a random option for those, a
    metric here must be deterministic, so they count as wrong (mc_unparsed counts them;
    the script's expected accuracy is higher by unparsed / (choices * n))."""
    return _mean(mc_items(predictions, references))


def mc_accuracy_lenient(predictions: Sequence, references: Sequence[str]) -> float:
    """Multiple-choice accuracy with the lenient parser (parse_choice): not comparable
    with published ScienceQA numbers, but kinder to a model that words its answer."""
    return _mean(mc_lenient_items(predictions, references))


def mc_unparsed(predictions: Sequence, lenient: bool = False) -> int:
    """How many answers name no option (scored as wrong by mc_accuracy)."""
    parser = parse_choice if lenient else parse_choice_llava
    return sum(parser(p) is None for p in predictions)


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


def cider_scores(predictions: Sequence, references: Sequence) -> tuple[float, list[float]]:
    """(corpus CIDEr, per-item CIDEr): pycocoevalcap's Cider (CIDEr-D) over its PTB
    tokenizer (which runs Java). The corpus score is the mean of the per-item ones, as
    pycocoevalcap computes it; the per-item scores depend on the whole corpus (document
    frequencies come from all of its references).

    references: one string or a list of strings per prediction. pycocoevalcap's scale:
    a perfect match on a varied corpus scores up to 10. A one-item corpus always scores 0.
    """
    _check_lengths(predictions, references)
    if len(references) == 0:
        return 0.0, []
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
    corpus_score, items = Cider().compute_score(gts, res)
    return float(corpus_score), [float(v) for v in items]


def cider(predictions: Sequence, references: Sequence) -> float:
    """Corpus CIDEr (see cider_scores)."""
    return cider_scores(predictions, references)[0]


# Metrics that score a prediction against every reference of its item.
MULTI_REFERENCE = {"cider"}

METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "vqa_accuracy": vqa_exact_match,
    "iou@0.5": grounding_accuracy,
    "cider": cider,
    "mc_accuracy": mc_accuracy,
    "mc_accuracy_lenient": mc_accuracy_lenient,
}

# Per-item scorers: the metric of a list is the mean of its items (CIDEr: corpus-level
# per-item scores, their mean is the corpus score).
_ITEMS: dict[str, Callable[[Sequence, Sequence], list[float]]] = {
    "vqa_accuracy": vqa_items,
    "iou@0.5": grounding_items,
    "mc_accuracy": mc_items,
    "mc_accuracy_lenient": mc_lenient_items,
}


def _check_metric(task_metric: str) -> None:
    if task_metric not in METRICS:
        raise ValueError(f"unknown metric {task_metric!r}; valid metrics: {sorted(METRICS)}")


def score(task_metric: str, predictions: Sequence, references: Sequence) -> float:
    """The metric named task_metric (a key of METRICS) of predictions against references."""
    _check_metric(task_metric)
    return METRICS[task_metric](predictions, references)


def score_items(task_metric: str, predictions: Sequence, references: Sequence) -> tuple[float, list[float]]:
    """(the metric, each item's score): the metric equals score(...) exactly."""
    _check_metric(task_metric)
    if task_metric == "cider":
        return cider_scores(predictions, references)
    items = _ITEMS[task_metric](predictions, references)
    return _mean(items), items
