"""Metrics against hand-computed cases, including the awkward ones."""

import pytest

from pilot_hpc.evaluate import (box_iou, cider, grounding_accuracy, normalize_answer, parse_box, score,
                                vqa_exact_match)


@pytest.mark.parametrize("raw,norm", [
    ("Two.", "2"), ("The red circle", "red circle"), ("0.5", "0.5"), ("1,000", "1000"),
    ("  Top   Left ", "top left"), ("an apple!", "apple"), ("none", "0"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_exact_match_counts_malformed_as_wrong():
    assert vqa_exact_match(["Two.", "red", None, 3], ["2", "blue", "x", "3"]) == 0.25
    assert vqa_exact_match([], []) == 0.0


def test_parse_box_from_free_text():
    assert parse_box("the box is [ 0.04 , 0.35 , 0.29 , 0.65 ] .") == (0.04, 0.35, 0.29, 0.65)
    assert parse_box("0.1 0.2 0.3") is None
    assert parse_box(None) is None


def test_box_iou_hand_computed_and_degenerate():
    assert box_iou([0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]) == pytest.approx(0.0625 / 0.4375)
    assert box_iou([0.5, 0.0, 0.1, 0.4], [0.0, 0.0, 1.0, 1.0]) == 0.0  # x2 < x1
    assert box_iou([0.2, 0.2, 0.2, 0.4], [0.2, 0.2, 0.2, 0.4]) == 0.0  # zero width
    assert box_iou([0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7]) == 0.0  # disjoint


def test_grounding_accuracy_threshold_and_malformed():
    ref = "[0.00, 0.00, 1.00, 1.00]"
    # IoU of [0, 0, 1, 0.5] with the unit box is exactly 0.5: counts.
    preds = ["[0.0, 0.0, 1.0, 0.5]", "[0.0, 0.0, 1.0, 0.49]", "no box here", "[0.9, 0.0, 0.1, 1.0]"]
    assert grounding_accuracy(preds, [ref] * 4) == 0.25
    with pytest.raises(ValueError, match=r"reference 1 is not a box: 'oops'"):
        grounding_accuracy(["[0, 0, 1, 1]"] * 2, [ref, "oops"])


CAPTIONS = ["a small red circle at the top left .", "a large blue square at the middle center .",
            "a small green triangle at the bottom right .", "a large yellow circle at the top right ."]


def test_cider_perfect_beats_wrong_and_punctuation_only_scores_zero():
    perfect = cider(CAPTIONS, CAPTIONS)
    wrong = cider(["a dog on a sofa ."] * 4, CAPTIONS)
    assert perfect > 1.0 and wrong < 0.05 * perfect
    # One caption replaced by punctuation only: it scores 0, the others keep theirs.
    mixed = cider(["..."] + CAPTIONS[1:], CAPTIONS)
    assert mixed == pytest.approx(perfect * 3 / 4, rel=1e-6)
    assert cider([], []) == 0.0


def test_score_dispatch():
    assert score("vqa_accuracy", ["2"], ["two"]) == 1.0
    with pytest.raises(ValueError, match="valid metrics"):
        score("bogus", [], [])
