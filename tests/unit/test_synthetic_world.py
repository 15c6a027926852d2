"""The synthetic world's scenario knobs: the smoke world unchanged, shared task test
splits, per-client Dirichlet skew, and cells a task never sees."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter

import pytest

from pilot_hpc.config import ConfigError, load_config
from pilot_hpc.data import synthetic
from pilot_hpc.data.synthetic import GRID, ROWS, COLS, ClientMix, SyntheticSpec


def _content_hash(folder: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name != "spec.json":
                with open(os.path.join(root, name), "rb") as fh:
                    h.update(name.encode())
                    h.update(fh.read())
    return h.hexdigest()[:16]


def test_the_smoke_world_is_unchanged_by_the_knobs(tmp_path):
    # Key and content of a small default world as the generator wrote them before the
    # knobs existed (commit 46d3b0d): a knob at its default changes no byte.
    spec = SyntheticSpec(["vqa", "caption", "grounding"], [5, 6, 7], 4, 5, 48, 3)
    assert spec.key() == "b399246ace04"
    synthetic.generate(spec, str(tmp_path / "w"))
    assert _content_hash(str(tmp_path / "w")) == "36f1ef6dcf42b202"


def _records(path):
    with open(path) as fh:
        return json.load(fh)


def _cell_of(record) -> int:
    """The grid cell of a caption ("... at the top left .") or grounding (box) record."""
    answer = record["conversations"][1]["value"]
    if record["task"] == "caption":
        row, col = answer.split(" at the ")[1].rstrip(" .").split()
        return ROWS.index(row) * GRID + COLS.index(col)
    x1, y1 = (float(v) for v in answer.strip("[]").split(",")[:2])
    return int(y1 * GRID) * GRID + int(x1 * GRID)


def world(tmp_path, **knobs) -> tuple[SyntheticSpec, str]:
    spec = SyntheticSpec(["caption", "caption", "grounding", "grounding"], [120, 140, 130, 150], 300, 200, 48, 1,
                         **knobs)
    folder = str(tmp_path / spec.key())
    synthetic.generate(spec, folder)
    return spec, folder


def test_a_task_split_is_shared_by_its_clients_and_covers_the_whole_task(tmp_path):
    spec, folder = world(tmp_path, eval_split="task", unseen_cells={"grounding": [2, 5, 8]})
    train, evals = synthetic.client_files(folder, 4)
    assert evals[0] == evals[1] != evals[2] == evals[3]
    for path in (evals[0], evals[2]):
        records = _records(path)
        assert len(records) == 300
        # The whole distribution: every cell and colour, the unseen cells included.
        assert {_cell_of(r) for r in records} == set(range(9))
        assert {w for r in records for w in r["conversations"][0]["value"].split() + r["conversations"][1]["value"].split()
                if w in synthetic.COLORS} == set(synthetic.COLORS)
    assert not any(name.startswith("client_") and name.endswith("_eval.json") for name in os.listdir(folder))


def test_unseen_cells_are_never_in_that_tasks_training_data_but_in_the_others(tmp_path):
    spec, folder = world(tmp_path, unseen_cells={"grounding": [2, 5, 8]})
    train, _ = synthetic.client_files(folder, 4)
    for k in (2, 3):
        assert not {_cell_of(r) for r in _records(train[k])} & {2, 5, 8}
    seen_by_caption = {_cell_of(r) for k in (0, 1) for r in _records(train[k])}
    assert {2, 5, 8} <= seen_by_caption
    warm = [r for r in _records(os.path.join(folder, "pretrain.json"))]
    assert not {_cell_of(r) for r in warm if r["task"] == "grounding"} & {2, 5, 8}
    assert {_cell_of(r) for r in warm if r["task"] == "caption"} & {2, 5, 8}


def test_dirichlet_skew_gives_each_client_its_own_mix():
    spec = SyntheticSpec(["vqa"] * 3, [10] * 3, 5, 5, 48, 0, skew_alpha=0.3, unseen_cells={"vqa": [4]})
    mixes = [spec.client_mix(k) for k in range(3)]
    assert len({m.color_weights for m in mixes}) == 3  # each client differs
    n = 6000
    for mix in mixes:
        rng = random.Random(11)
        scenes = [synthetic.draw_scene(rng, mix) for _ in range(n)]
        colors = Counter(s.color for s in scenes)
        cells = Counter(s.row * GRID + s.col for s in scenes)
        assert cells[4] == 0  # unseen
        for name, p in zip(synthetic.COLORS, mix.color_weights):
            sd = (p * (1 - p) / n) ** 0.5
            assert abs(colors[name] / n - p) <= 5 * sd + 1e-9, (name, colors[name] / n, p)
        for cell, p in enumerate(mix.cell_probabilities()):
            sd = (p * (1 - p) / n) ** 0.5
            assert abs(cells[cell] / n - p) <= 5 * sd + 1e-9, (cell, cells[cell] / n, p)
    # Small alpha concentrates: a client's most likely colour holds well over a quarter.
    assert all(max(m.color_weights) > 0.4 for m in mixes)


def test_cell_probabilities_fall_back_when_the_mix_lives_on_unseen_cells():
    mix = ClientMix(cell_weights=tuple([1.0] + [0.0] * 8), unseen=(0,))
    probs = mix.cell_probabilities()
    assert probs[0] == 0 and abs(sum(probs) - 1) < 1e-12 and min(probs[1:]) > 0


def test_the_knobs_are_checked():
    with pytest.raises(ConfigError, match="data.unseen_cells.grounding"):
        load_config(None, ["data.unseen_cells={grounding: [9]}"])
    with pytest.raises(ConfigError, match="no client has"):
        load_config(None, ["fl.num_clients=2", "fl.client_tasks=[vqa, caption]", "pilot.top_m=1",
                           "fl.task_metrics={vqa: vqa_accuracy, caption: cider}", "data.unseen_cells={grounding: [1]}"])
    with pytest.raises(ConfigError, match="data.skew_alpha"):
        load_config(None, ["data.skew_alpha=-1"])
    with pytest.raises(ConfigError, match="data.eval_split must be one of client, task"):
        load_config(None, ["data.eval_split=all"])
