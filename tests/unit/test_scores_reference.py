"""The scorers against the reference evaluators' verdicts.

VQA: EvalAI's answer processor, as LLaVA's llava/eval/m4c_evaluator.py runs it (one
reference per item: its soft score is then exact match). ScienceQA: LLaVA-1.5's
llava/eval/eval_science_qa.py. Every verdict below was worked out by hand from the
reference's rules (noted per case where it is surprising), not from this code.
"""

import pytest

from pilot_hpc.metrics.scores import (CONTRACTIONS, mc_accuracy, mc_accuracy_lenient, mc_unparsed, normalize_answer,
                                     parse_box, parse_choice, parse_choice_llava, score_items, vqa_exact_match)

# (prediction, reference, the reference's verdict)
VQA_PAIRS = [
    ("dont", "don't", True),  # the contractions table restores the apostrophe
    ("Don't", "dont", True),
    ("isnt", "isn't", True),
    ("oclock", "o'clock", True),
    ("yall", "y'all", True),
    ("somebody'd", "somebodyd", True),  # the table's one reversed entry
    ("Im", "i'm", False),  # the table's "Im" is looked up after lower-casing: never fires
    ("I'm", "im", False),
    ("What's", "whats", False),  # "'s" is split off first ("what 's"); "whats" -> "what's"
    ("hes", "he's", False),  # "hes" -> "he's", but the reference "he's" -> "he 's"
    ("it's", "its", False),
    ("the man's hat", "man 's hat", True),
    ("Let's go", "let's go", True),  # both sides split: "let 's go"
    ("Two dogs", "2 dogs", True),
    ("none", "0", True),
    ("twenty", "20", False),  # number words stop at ten
    ("1,000", "1000", True),  # commas go before anything else
    ("3,5", "35", True),
    ("3.5", "35", False),  # a period before a digit stays
    ("0.5", ".5", False),
    ("5.", "5", True),
    ("yes.", "yes", True),
    ("a.m.", "am", True),
    ("e.g.", "eg", True),
    ("one. two", "1 2", True),
    ("x" + "." * 40, "x", False),  # at most 32 periods go (re.UNICODE passed as count)
    ("red-blue", "red blue", True),  # a mark between letters becomes a space
    ("red-blue", "redblue", False),
    ("red - blue", "red blue", True),  # a mark next to a space is deleted
    ("left/ right", "left right", True),
    ("1/2", "1 2", True),
    ("1 / 2", "12", False),
    ("(2)", "2", True),
    ("[1]", "1", True),
    ("Yes!", "yes", True),
    ("dog?", "dog", True),
    ("red, blue", "red blue", True),
    ("10%", "10", False),  # % and $ are not in the punctuation list
    ("$5", "5", False),
    ("An apple", "apple", True),
    ("a-b", "a b", True),  # "a b" -> "b" on both sides: the article goes after the split
    ("The", "a", True),  # both normalise to ""
    ("red\ncar", "red car", True),
    ("don't", "do not", False),
]


@pytest.mark.parametrize("pred,ref,verdict", VQA_PAIRS)
def test_vqa_pairs_match_the_reference_verdicts(pred, ref, verdict):
    assert (normalize_answer(pred) == normalize_answer(ref)) is verdict
    assert vqa_exact_match([pred], [ref]) == float(verdict)


def test_vqa_accuracy_over_the_table():
    preds, refs, verdicts = zip(*VQA_PAIRS)
    value, items = score_items("vqa_accuracy", list(preds), list(refs))
    assert items == [float(v) for v in verdicts]
    assert value == sum(verdicts) / len(VQA_PAIRS)


def test_contractions_table_shape():
    # The reference's table has 120 entries, 4 of them with capitals that never fire
    # (Id've, I'dve, Im, Ive): the 116 that can fire, all lower case.
    assert len(CONTRACTIONS) == 116
    assert all(k == k.lower() for k in CONTRACTIONS)
    assert CONTRACTIONS["couldn'tve"] == CONTRACTIONS["couldnt've"] == "couldn't've"
    assert CONTRACTIONS["y'alld've"] == CONTRACTIONS["yall'd've"] == CONTRACTIONS["y'all'dve"] == "y'all'd've"
    assert "mustnt've" not in CONTRACTIONS and CONTRACTIONS["notve"] == "not've"


# (answer text, the letter LLaVA-1.5's eval_science_qa.py reads, or None for "FAILED")
SQA_LLAVA = [
    ("A", "A"), ("E", "E"),
    ("F", None),  # beyond the five options (get_pred_idx rejects it)
    ("B. The cat", "B"), ("B.  cat", "B"),
    ("B.", None),  # needs ". " after the letter
    ("B.cat", None), ("(C)", None), ("b", None), ("B) cat", None), ("answer: (a)", None),
    ("The answer is C.", "C"),
    ("The answer is C, because", "C"),  # "([A-Z])." takes any one character after
    ("The answer is C", None),  # ... so a letter at the very end is missed
    ("Both are mammals. The answer is D..", "D"),
    ("The answer is A. The answer is B.", None),  # two matches: FAILED
    ("The answer is F.", None),
    ("the answer is C.", None),  # case-sensitive
    ("The answer is (B).", None),
    ("Option d is correct.", None),
    (" A", None), ("A\n", None),  # the release does not strip
    ("", None), ("AB", None), (None, None),
]


@pytest.mark.parametrize("text,letter", SQA_LLAVA)
def test_scienceqa_letters_as_llava_reads_them(text, letter):
    assert parse_choice_llava(text) == letter


def test_scienceqa_accuracy_scores_unparseable_as_wrong_and_counts_them():
    # The script draws a random option for a FAILED answer; here it is wrong, always.
    texts = [t for t, _ in SQA_LLAVA]
    refs = [letter or "A" for _, letter in SQA_LLAVA]  # an unparseable answer's reference: A
    parsed = sum(letter is not None for _, letter in SQA_LLAVA)
    assert mc_accuracy(texts, refs) == parsed / len(texts)
    assert mc_unparsed(texts) == len(texts) - parsed
    # " A" and "A\n" are A to the lenient parser (and "(C)" and "Option d ..." name letters).
    assert mc_accuracy_lenient(texts, refs) > mc_accuracy(texts, refs)
    assert mc_unparsed(texts, lenient=True) < mc_unparsed(texts)


def test_lenient_parser_reads_a_clear_option_phrase():
    assert parse_choice("Option d is correct.") == "D"
    assert parse_choice("I pick choice b") == "B"
    assert parse_choice("the answer is a dog") is None  # an article, not option A


@pytest.mark.parametrize("text,box", [
    ("x1=0.37, y1=0.584, x2=0.6, y2=0.9", (0.37, 0.584, 0.6, 0.9)),  # the digit in "x1" is a name
    ("x1: 0.1 y1: 0.2 x2: 0.3 y2: 0.4", (0.1, 0.2, 0.3, 0.4)),
    ("box2 at 0.1 0.2 0.3 0.4", (0.1, 0.2, 0.3, 0.4)),
    ("(0.1, 0.2), (0.3, 0.4)", (0.1, 0.2, 0.3, 0.4)),
    ("from 0.1-0.2 to 0.3-0.4", (0.1, 0.2, 0.3, 0.4)),  # a dash between numbers is no sign
])
def test_parse_box_reads_numbers_only_where_coordinates_are(text, box):
    assert parse_box(text) == pytest.approx(box)


def test_parse_box_names_alone_are_no_box():
    assert parse_box("x1=0.37, y1=0.584") is None
    assert parse_box("x1 y1 x2 y2") is None
