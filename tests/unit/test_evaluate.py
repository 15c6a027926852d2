"""Metrics against hand-computed cases, including the awkward ones."""

import os

import pytest

from pilot_hpc.metrics.scores import (METRICS, box_iou, cider, cider_scores, grounding_accuracy, mc_accuracy,
                                     mc_accuracy_lenient, normalize_answer, parse_box, parse_choice, score, score_items,
                                     vqa_exact_match)


@pytest.mark.parametrize("raw,norm", [
    ("Two.", "2"), ("The red circle", "red circle"), ("0.5", "0.5"), ("1,000", "1000"),
    ("  Top \t  Left\n", "top left"), ("an apple!", "apple"), ("none", "0"), ("Ten", "10"),
    ("red/blue", "red blue"), ("yes.", "yes"), ("the", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_normalize_answer_refuses_non_strings():
    # str(None) is "none", which would normalise to "0" and match a "0" answer.
    with pytest.raises(TypeError):
        normalize_answer(None)


def test_vqa_exact_match_counts_malformed_as_wrong():
    preds = ["Two.", "red", None, 3, "The red circle", "0.5"]
    refs = ["2", "blue", "x", "3", "red circle", "0.5"]
    # Matches: "Two."="2", "The red circle"="red circle", "0.5"="0.5"; None and 3 are wrong.
    assert vqa_exact_match(preds, refs) == pytest.approx(3 / 6)
    assert vqa_exact_match(["0.5"], ["5"]) == 0.0  # the decimal point is kept, not dropped
    assert vqa_exact_match([], []) == 0.0


def test_vqa_exact_match_rejects_caller_errors():
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        vqa_exact_match(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="reference 1"):
        vqa_exact_match(["a", "b"], ["a", None])


@pytest.mark.parametrize("text,box", [
    ("the box is [ 0.04 , 0.35 , 0.29 , 0.65 ] .", (0.04, 0.35, 0.29, 0.65)),
    ("[0.02, 0.02, 0.31, 0.31]", (0.02, 0.02, 0.31, 0.31)),
    ("0.1 0.2 0.3 0.4 0.9", (0.1, 0.2, 0.3, 0.4)),  # no brackets: first four numbers
    ("object 2 is at [.1, .2, .3, .4]", (0.1, 0.2, 0.3, 0.4)),  # a bracketed box wins
    ("[0.5, 0.0, 0.1, 0.4]", (0.5, 0.0, 0.1, 0.4)),  # inverted: kept as written
    ("[-0.1, 0, 1, 1]", (-0.1, 0.0, 1.0, 1.0)),
])
def test_parse_box(text, box):
    assert parse_box(text) == pytest.approx(box)


@pytest.mark.parametrize("text", ["0.1 0.2 0.3", "no box here", "", None, "[0.1, 0.2, 0.3]"])
def test_parse_box_needs_four_numbers(text):
    assert parse_box(text) is None


def test_box_iou_hand_computed_and_degenerate():
    # Intersection 0.25 x 0.25 = 0.0625; union 0.25 + 0.25 - 0.0625 = 0.4375: IoU 1/7.
    assert box_iou([0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]) == pytest.approx(1 / 7)
    assert box_iou([0.1, 0.2, 0.6, 0.9], [0.1, 0.2, 0.6, 0.9]) == pytest.approx(1.0)
    assert box_iou([0.5, 0.0, 0.1, 0.4], [0.0, 0.0, 1.0, 1.0]) == 0.0  # x2 < x1
    assert box_iou([0.0, 0.0, 1.0, 1.0], [0.0, 0.6, 1.0, 0.2]) == 0.0  # y2 < y1
    assert box_iou([0.2, 0.2, 0.2, 0.4], [0.2, 0.2, 0.2, 0.4]) == 0.0  # zero width, zero union
    assert box_iou([0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7]) == 0.0  # disjoint


def test_grounding_accuracy_threshold_and_malformed():
    ref = "[0.00, 0.00, 1.00, 1.00]"
    # IoU with the unit box: exactly 0.5 (counts), 0.49, no box, inverted box.
    preds = ["[0.0, 0.0, 1.0, 0.5]", "[0.0, 0.0, 1.0, 0.49]", "no box here", "[0.9, 0.0, 0.1, 1.0]", None]
    assert grounding_accuracy(preds, [ref] * 5) == pytest.approx(1 / 5)
    assert grounding_accuracy(preds[1:2], [ref], threshold=0.4) == 1.0
    assert grounding_accuracy([], []) == 0.0
    with pytest.raises(ValueError, match=r"reference 1 is not a box: 'oops'"):
        grounding_accuracy(["[0, 0, 1, 1]"] * 2, [ref, "oops"])
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        grounding_accuracy([ref], [ref, ref])


CAPTIONS = ["a small red circle at the top left .", "a large blue square at the middle center .",
            "a small green triangle at the bottom right .", "a large yellow circle at the top right ."]


@pytest.fixture(scope="module")
def perfect():
    return cider(CAPTIONS, CAPTIONS)


def test_cider_perfect_beats_wrong(perfect):
    wrong = cider(["a dog on a sofa ."] * 4, CAPTIONS)
    # pycocoevalcap's CIDEr-D: identical captions on this corpus score 10 (its x10 scale).
    assert perfect == pytest.approx(10.0, rel=1e-6)
    assert wrong < 0.05
    # Several references per item, as strings or lists, and a one-item corpus (idf all 0).
    assert cider(CAPTIONS, [[c, "an odd picture"] for c in CAPTIONS]) > 1.0
    assert cider(CAPTIONS[:1], CAPTIONS[:1]) == 0.0
    assert cider([], []) == 0.0


@pytest.mark.parametrize("bad", ["...", "", None, " \n "])
def test_cider_empty_hypothesis_scores_zero_for_that_item(perfect, bad):
    # Document frequencies come from references only, so the others keep theirs.
    assert cider([bad] + CAPTIONS[1:], CAPTIONS) == pytest.approx(perfect * 3 / 4, rel=1e-6)


def test_cider_line_breaks_inside_a_caption_do_not_shift_the_others(perfect):
    # Java's tokenizer ends a line at \r or U+2028; unguarded, every later caption would be
    # paired with the wrong image.
    preds = ["a small red circle\rat the top left .", CAPTIONS[1], "a small green\u2028triangle at the bottom right .",
             CAPTIONS[3]]
    assert cider(preds, CAPTIONS) == pytest.approx(perfect, rel=1e-6)


def test_cider_is_quiet_and_checks_its_inputs(capfd, monkeypatch):
    cider(CAPTIONS, CAPTIONS)
    assert "PTBTokenizer" not in capfd.readouterr().err
    with pytest.raises(ValueError, match="reference 1"):
        cider(CAPTIONS[:2], [CAPTIONS[0], []])
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        cider(CAPTIONS[:1], CAPTIONS[:2])
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="java"):
        cider(CAPTIONS, CAPTIONS)


def test_config_metric_names_are_the_scorers():
    from typing import get_args

    from pilot_hpc.config import Metric

    assert set(get_args(Metric)) == set(METRICS)


def test_score_dispatch(perfect):
    assert set(METRICS) == {"vqa_accuracy", "iou@0.5", "cider", "mc_accuracy", "mc_accuracy_lenient"}
    assert score("vqa_accuracy", ["2", "no"], ["two", "yes"]) == 0.5
    assert score("iou@0.5", ["[0, 0, 1, 0.5]"], ["[0, 0, 1, 1]"]) == 1.0
    assert score("cider", CAPTIONS, CAPTIONS) == pytest.approx(perfect)
    assert score("mc_accuracy_lenient", ["(B)", "The answer is C."], ["B", "D"]) == 0.5
    assert score("mc_accuracy", ["(B)", "The answer is D."], ["B", "D"]) == 0.5  # LLaVA's rules: "(B)" fails
    with pytest.raises(ValueError, match=r"valid metrics: \['cider', 'iou@0.5', 'mc_accuracy', "
                                         r"'mc_accuracy_lenient', 'vqa_accuracy'\]"):
        score("bogus", [], [])


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), (" b ", "B"), ("The answer is B.", "B"), ("b) dog", "B"),
    ("C. a red fox", "C"), ("(d) the moon", "D"), ("Answer: (e)", "E"), ("answer: C", "C"),
    ("A or B", "A"),  # a hedge scores by the first option named
    ("I think C is right", "C"),  # "I" is not an option letter
    ("Option D, because E is false", "D"), ("Option d is correct.", "D"), ("the choice (b)", "B"),
    ("The answer is a dog, so E", "E"),  # the article "a" after "answer is" names nothing
    ("F", None), ("The answer is F.", None),  # outside A-E
    ("a dog on a sofa", None),  # lower-case "a" in running text is the article
    ("", None), ("...", None), (None, None), (3, None), ("AB", None), ("E's", None),
])
def test_parse_choice(text, letter):
    assert parse_choice(text) == letter


def test_mc_accuracy_hand_computed():
    preds = ["B", "(C)", "The answer is A.", "d) seven", "A or B", "F", None, "banana"]
    refs = ["B", "C", "A", "D", "B", "E", "A", "A"]
    # Right: B, (C), "answer is A", "d)"; "A or B" reads A (ref B); F, None, banana wrong.
    assert mc_accuracy_lenient(preds, refs) == pytest.approx(4 / 8)
    assert mc_accuracy_lenient(["b"], [" b "]) == 1.0  # references are trimmed and upper-cased
    assert mc_accuracy_lenient([], []) == 0.0
    # LLaVA's rules on the same answers: only "B" and "The answer is A." parse.
    assert mc_accuracy(preds, refs) == pytest.approx(2 / 8)


@pytest.mark.parametrize("metric", [mc_accuracy, mc_accuracy_lenient])
@pytest.mark.parametrize("bad", ["F", "AB", "", None, 1])
def test_mc_accuracy_rejects_bad_references(metric, bad):
    with pytest.raises(ValueError, match="reference 1 is not an option letter"):
        metric(["A", "A"], ["A", bad])
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        metric(["A"], ["A", "B"])


@pytest.mark.parametrize("metric,preds,refs", [
    ("vqa_accuracy", ["Two.", "red", None, "dont"], ["2", "blue", "x", "don't"]),
    ("iou@0.5", ["[0, 0, 1, 0.5]", "nothing", "[0, 0, 1, 0.4]"], ["[0, 0, 1, 1]"] * 3),
    ("mc_accuracy", ["B", "(C)", "The answer is A."], ["B", "C", "A"]),
    ("mc_accuracy_lenient", ["B", "(C)", "banana"], ["B", "C", "A"]),
])
def test_score_items_mean_is_the_metric(metric, preds, refs):
    value, items = score_items(metric, preds, refs)
    assert value == score(metric, preds, refs)
    assert value == sum(items) / len(items)
    assert set(items) <= {0.0, 1.0} and 0.0 < value < 1.0


def test_cider_per_item_scores_average_to_the_corpus_score(perfect):
    preds = [CAPTIONS[0], "a dog on a sofa .", CAPTIONS[2], "a large yellow square at the top right ."]
    corpus, items = cider_scores(preds, CAPTIONS)
    assert corpus == cider(preds, CAPTIONS)
    # pycocoevalcap takes np.mean of its per-item array: float64, summation order may
    # differ from Python's sum by an ulp or so, hence the relative 1e-12.
    assert corpus == pytest.approx(sum(items) / 4, rel=1e-12)
    assert items[1] < 0.05 < items[3] < items[0]


def test_prediction_rows_carry_the_answer_file_fields(tmp_path):
    from types import SimpleNamespace

    from pilot_hpc.data.records import Sample
    from pilot_hpc.metrics.generation import Evaluation, prediction_rows, read_predictions, write_predictions

    samples = [Sample(id=f"q{i}", image_path=f"/img/{i}.png", turns=[(f"question {i}", ref)])
               for i, ref in enumerate(["B", "C"])]
    dataset = SimpleNamespace(samples=samples, references=lambda i: [samples[i].turns[0][1]])
    ev = Evaluation(0.5, ["B", "(C)"], ["B", "C"], [1.0, 0.0])
    rows = prediction_rows(dataset, ev, "mc_accuracy", "m")
    assert [r["parsed"] for r in rows] == ["B", None]  # LLaVA's rules: "(C)" names no option
    want = {"question_id": "q1", "text": "(C)", "prompt": "<image>\nquestion 1", "answer_id": "m/q1",
            "model_id": "m", "reference": "C", "score": 0.0, "metadata": {"image": "/img/1.png"}}
    assert {k: rows[1][k] for k in want} == want
    path = str(tmp_path / "p" / "client_00.jsonl")
    write_predictions(path, rows)
    assert read_predictions(path) == rows and not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "p"))
    assert tuple(ev) == (0.5, ["B", "(C)"])  # unpacks as (value, predictions)
