"""The second research world's knob, data.unseen_combos=latin3: every (colour, cell)
combination is unseen by exactly one task, in training and in that task's warm start,
while every colour, cell and answer word stays in every task's training data; the shared
test splits tag each item seen or unseen for its task; metrics per subset."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from pilot_hpc.config import ConfigError, load_config
from pilot_hpc.data import synthetic
from pilot_hpc.data.records import load_records
from pilot_hpc.data.synthetic import COLORS, GRID, SyntheticSpec
from pilot_hpc.metrics.subsets import eval_view, subset_values

TASKS = ["caption", "grounding", "vqa"]  # canonical (sorted) order: t = 0, 1, 2


def test_latin3_leaves_each_combination_to_exactly_one_task():
    unseen = [set(synthetic.latin3_unseen(t)) for t in range(3)]
    pairs = {(c, j) for c in range(len(COLORS)) for j in range(GRID * GRID)}
    assert all(len(u) == 12 for u in unseen) and set().union(*unseen) == pairs
    assert not (unseen[0] & unseen[1]) and not (unseen[0] & unseen[2]) and not (unseen[1] & unseen[2])
    for u in unseen:  # every colour keeps 6 of its 9 cells, every cell 2 or 3 of its 4 colours
        assert all(sum((c, j) not in u for j in range(9)) == 6 for c in range(4))
        assert all(sum((c, j) not in u for c in range(4)) in (2, 3) for j in range(9))


def test_the_shared_test_splits_tag_each_item_for_its_task(tmp_path):
    spec = SyntheticSpec(["vqa", "caption", "grounding"], [20] * 3, 900, 30, 48, 1, eval_split="task",
                         skew_alpha=0.5, unseen_combos="latin3")
    synthetic.generate(spec, str(tmp_path / "w"))
    for task in TASKS:
        with open(tmp_path / "w" / f"task_{task}_test.json") as fh:
            records = json.load(fh)
        samples = load_records(str(tmp_path / "w" / f"task_{task}_test.json"))
        tags = Counter(s.subset for s in samples)
        assert sum(tags.values()) == 900 and set(tags) == {"seen", "unseen"}
        assert 0.25 < tags["unseen"] / 900 < 0.42  # 12 of the 36 combinations, drawn uniformly
        assert [r["subset"] for r in records] == [s.subset for s in samples]
    # Grounding items say colour and cell: each tag is the latin3 rule for grounding (t = 1).
    with open(tmp_path / "w" / "task_grounding_test.json") as fh:
        for r in json.load(fh):
            color = next(i for i, c in enumerate(COLORS) if c in r["conversations"][0]["value"].split())
            x1, y1 = (float(v) for v in r["conversations"][1]["value"].strip("[]").split(", ")[:2])
            cell = int(y1 * 48 // 16) * GRID + int(x1 * 48 // 16)
            assert r["subset"] == ("unseen" if (color, cell) in synthetic.latin3_unseen(1) else "seen")
    # Training files carry no tag.
    with open(tmp_path / "w" / "client_00_train.json") as fh:
        assert not any("subset" in r for r in json.load(fh))


def test_a_tasks_own_draws_avoid_its_unseen_combinations():
    import random

    spec = SyntheticSpec(["vqa", "caption", "grounding"], [1, 1, 1], 1, 1, 48, 0, skew_alpha=0.5,
                         unseen_combos="latin3")
    for k, task in enumerate(spec.client_tasks):
        mix = spec.client_mix(k)
        banned = set(spec.combos_unseen_by(task))
        assert banned and set(mix.unseen_combos) == banned
        rng = random.Random(k)
        for _ in range(3000):
            s = synthetic.draw_scene(rng, mix)
            combo = (list(COLORS).index(s.color), s.row * GRID + s.col)
            assert combo not in banned


def test_the_knob_needs_three_tasks_and_both_subsets():
    with pytest.raises(ConfigError, match="data.eval_subsets=\\[seen, unseen\\]"):
        load_config(None, ["data.unseen_combos=latin3"])
    cfg = load_config(None, ["data.unseen_combos=latin3", "data.eval_subsets=[seen, unseen]"])
    assert synthetic.spec_for(cfg).unseen_combos == "latin3"
    # The knob is part of the world's key (its data is another cache folder); at its default
    # it stays out (the smoke world's key is pinned in test_synthetic_world).
    assert synthetic.spec_for(cfg).key() != synthetic.spec_for(load_config(None)).key()


class _Sample:
    def __init__(self, subset, where="f.json: record 0"):
        self.subset, self.where, self.id = subset, where, "0"


class _Data:
    def __init__(self, tags):
        self.samples = [_Sample(t) for t in tags]

    def __len__(self):
        return len(self.samples)


def test_subset_values_and_the_interim_view():
    data = _Data(["seen", "unseen", "seen", None])
    assert subset_values(data, [1.0, 0.0, 0.5, 1.0], ["seen", "unseen"]) == [0.75, 0.0]
    assert subset_values(data, [1.0, 0.0, 0.5, 1.0], []) == []
    empty = subset_values(_Data(["seen"]), [1.0], ["seen", "unseen"])
    assert empty[0] == 1.0 and math.isnan(empty[1])
    with pytest.raises(Exception, match="subset 'other' is not in data.eval_subsets"):
        subset_values(_Data(["other"]), [1.0], ["seen", "unseen"])
    assert len(eval_view(data, 2, final=False)) == 2 and eval_view(data, 2, final=True) is data
    assert eval_view(data, 0, final=False) is data and len(data) == 4  # the view copies, the split stays
