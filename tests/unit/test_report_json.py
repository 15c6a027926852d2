"""Strict JSON out (non-finite floats as null) and the project's readers taking null as
"no value": metrics.json, predictions, and the tables built from them."""

import json
import math

import pytest

from pilot_hpc import jsonout, report
from pilot_hpc.config import load_config

NAN, INF = float("nan"), float("inf")


def strict_loads(text: str):
    """json.loads as a strict parser reads: NaN, Infinity and -Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _row(k, task, value, ce):
    return {"client": k, "task": task, "metric": "vqa_accuracy" if task == "vqa" else "cider", "value": value,
            "ce": ce, "diff": NAN, "steps": 3.0, "bad_samples": 0.0}


def history():
    """Round 0 as every run has it (no losses yet: NaN), and a round with an infinite
    loss, a NaN metric and a -inf."""
    return [{"round": 0, "clients": [_row(0, "vqa", 10.0, NAN), _row(1, "vqa", 20.0, NAN),
                                     _row(2, "caption", 30.0, NAN)]},
            {"round": 1, "clients": [_row(0, "vqa", NAN, INF), _row(1, "vqa", 40.0, -INF),
                                     _row(2, "caption", 50.0, 1.5)]}]


def test_metrics_json_is_strict_json_with_null_for_non_finite(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "fl.num_clients=3", "pilot.top_m=1",
                             "fl.client_tasks=[vqa, vqa, caption]", "fl.task_metrics={vqa: vqa_accuracy, caption: cider}"])
    paths = report.write_outputs(history(), cfg)
    text = open(paths["metrics"]).read()
    doc = strict_loads(text)  # raised on the bare NaN/Infinity written before
    last = doc["rounds"][1]["clients"]
    assert [c["value"] for c in last] == [None, 40.0, 50.0]
    assert [c["ce"] for c in last] == [None, None, 1.5]
    assert all(c["ce"] is None and c["diff"] is None for c in doc["rounds"][0]["clients"])
    assert doc["final"] == last

    back = report.read_metrics(paths["metrics"])  # null -> NaN: "no value", as the run held it
    assert math.isnan(back["final"][0]["value"]) and back["final"][1]["value"] == 40.0
    table = report.results_table(back["rounds"])
    assert "| 0 | vqa | VQA acc | 10.0 | nan | +nan |" in table and "| 2 | caption | CIDEr | 30.0 | 50.0 | +20.0 |" in table
    groups = {"a": [back], "b": [report.read_metrics(paths["metrics"])]}
    cmp = report.comparison_table(groups)
    assert cmp.count("| nan | 40.0 | 50.0 |") == 2
    # Equal documents compare equal, NaN included (tools/parity compares runs this way).
    assert groups["a"][0] == groups["b"][0]
    report.comparison_plot(groups, str(tmp_path / "cmp.png"), "t")
    assert (tmp_path / "cmp.png").stat().st_size > 0


def test_predictions_with_a_non_finite_score_are_strict_json(tmp_path):
    from pilot_hpc.metrics.generation import read_predictions, write_predictions

    path = tmp_path / "p" / "client_00.jsonl"
    write_predictions(str(path), [{"id": "a", "score": NAN}, {"id": "b", "score": 0.5}, {"id": "c", "score": -INF}])
    lines = [strict_loads(line) for line in path.read_text().splitlines()]
    assert [r["score"] for r in lines] == [None, 0.5, None] == [r["score"] for r in read_predictions(str(path))]


def test_the_writer_refuses_a_non_finite_that_slips_past(monkeypatch):
    assert jsonout.dumps({"a": [1.0, (NAN, {"b": INF})], "c": "x"}) == '{"a": [1.0, [null, {"b": null}]], "c": "x"}'
    monkeypatch.setattr(jsonout, "finite_or_null", lambda obj: obj)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        jsonout.dumps({"a": NAN})
