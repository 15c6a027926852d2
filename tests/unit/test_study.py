"""The study tool: groups of several grids in one table, paired per-seed differences."""

import json
import math
import os

import pytest

from helpers import REPO
from pilot_hpc import launch
from pilot_hpc.config import ConfigError
from pilot_hpc.tools import study

TASKS = ["vqa"] * 3 + ["caption"] * 3 + ["grounding"] * 3


def _grid(tmp_path, name, body):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nconfig: {REPO}/configs/smoke_9client.yaml\noutput_root: {tmp_path}/study/{name}\n"
                    + body)
    return str(path)


def _finish(e, values):
    """A fake finished run of element e whose clients score `values` (per task)."""
    os.makedirs(e.output_dir, exist_ok=True)
    clients = [{"client": k, "task": t, "metric": "x", "value": values[t]} for k, t in enumerate(TASKS)]
    with open(os.path.join(e.output_dir, "metrics.json"), "w") as fh:
        json.dump({"config_hash": e.config_hash, "rounds": [{"round": 0, "clients": clients}], "final": clients}, fh)


def test_paired_differences_match_runs_by_seed_across_grids(tmp_path, capsys):
    a = _grid(tmp_path, "a", "grid:\n  fl.strategy: [pilot, local]\n  run.seed: [0, 1, 2]\n")
    b = _grid(tmp_path, "b", "overrides: [fedadam.server_lr=0.01]\ngrid:\n  fl.strategy: [fedadam]\n"
                             "  run.seed: [0, 1]\n")
    score = {("pilot", 0): 50, ("pilot", 1): 60, ("pilot", 2): 70, ("local", 0): 55, ("local", 1): 50,
             ("local", 2): 65}
    for e in launch.expand(launch.load_grid(a)):
        s, strategy = int(e.name[-1]), e.name.split("_")[0].replace("strategy", "")
        _finish(e, {"vqa": score[strategy, s], "caption": 500.0 + s, "grounding": 10.0})
    elements_b = launch.expand(launch.load_grid(b))
    _finish(elements_b[1], {"vqa": 40.0, "caption": 400.0, "grounding": 20.0})  # seed 1 only
    groups = study.collect([(a, "fl.strategy"), (b, "fl.strategy")])
    assert sorted(groups) == ["fedadam", "local", "pilot"] and sorted(groups["fedadam"]) == [1]
    rows = study.paired(groups, "pilot", "local")
    vqa = next(r for r in rows if r["task"] == "vqa")
    assert vqa["seeds"] == [0, 1, 2] and vqa["diffs"] == [-5.0, 10.0, 5.0] and vqa["wins"] == 2
    assert vqa["mean"] == pytest.approx(10 / 3)
    caption = next(r for r in rows if r["task"] == "caption")
    assert (caption["wins"], caption["ties"]) == (0, 3)  # equal in every seed: ties, no win
    (adam,) = [r for r in study.paired(groups, "pilot", "fedadam") if r["task"] == "grounding"]
    assert adam["seeds"] == [1] and adam["diffs"] == [-10.0]  # only the seed both ran
    # mean 10/3, sd 7.638 (n - 1), t_{0.975, 2} = 4.3027: [-15.64, +22.31]; t = 0.756 on 2 df: p = 0.529.
    # No predictions files in these fake runs: no item test.
    assert ("| pilot - local | vqa | -5.00 | +10.00 | +5.00 | +3.33 | [-15.64, +22.31] | 0.529 | n/a | 2 / 0 / 1 |"
            in study.paired_table(rows))
    # A pair with fewer seeds fills its own seeds' columns: seed 1 only, under "seed 1".
    both = study.paired_table(rows + [adam])
    assert "| difference | task | seed 0 | seed 1 | seed 2 |" in both
    assert "| pilot - fedadam | grounding |  | -10.00 |  | -10.00 | n/a | n/a | n/a | 0 / 0 / 1 |" in both
    assert study.main(["--grid", a, "--group-by", "fl.strategy", "--grid", b, "--group-by", "fl.strategy",
                       "--pair", "pilot:local", "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "| fedadam | 1 |" in out and "2 / 0 / 1" in out and (tmp_path / "p.png").stat().st_size > 0
    # By default a column per client: pilot's client 0 scored 50, 60, 70 over the seeds.
    assert "| c0 vqa |" in out and "| pilot | 3 | 60.0 ± 8.2 | 60.0 ± 8.2 |" in out
    # --averages: the task averages only. pilot's VQA: 50, 60, 70 -> 60.0 ± 8.2 (population sd).
    assert study.main(["--grid", a, "--group-by", "fl.strategy", "--averages"]) == 0
    out = capsys.readouterr().out
    assert "| method | runs | avg vqa (vqa) | avg caption (caption) | avg grounding (grounding) |" in out
    assert "c0 vqa" not in out
    assert "| pilot | 3 | 60.0 ± 8.2 | 501.0 ± 0.8 | 10.0 ± 0.0 |" in out


def test_a_label_in_two_grids_and_an_unknown_pair_are_errors(tmp_path):
    a = _grid(tmp_path, "a", "grid:\n  fl.strategy: [pilot]\n  run.seed: [0]\n")
    c = _grid(tmp_path, "c", "grid:\n  fl.strategy: [pilot]\n  run.seed: [1]\n")
    with pytest.raises(ConfigError, match="group 'pilot' of .*c.yaml is already a group"):
        study.collect([(a, "fl.strategy"), (c, "fl.strategy")])
    with pytest.raises(ConfigError, match="no group 'nope'"):
        study.paired(study.collect([(a, "fl.strategy")]), "pilot", "nope")
    assert study.main(["--grid", a, "--group-by", "run.seed", "--grid", c]) == 2


def test_a_null_value_reads_as_no_value(tmp_path, capsys):
    """metrics.json writes a non-finite value as null (pilot_hpc.jsonout): the study reads it
    as NaN, so the task mean and the table say nan instead of failing on None."""
    a = _grid(tmp_path, "a", "grid:\n  fl.strategy: [pilot, local]\n  run.seed: [0]\n")
    pilot, local = launch.expand(launch.load_grid(a))
    _finish(pilot, {"vqa": None, "caption": 500.0, "grounding": 10.0})
    _finish(local, {"vqa": 40.0, "caption": 400.0, "grounding": 20.0})
    groups = study.collect([(a, "fl.strategy")])
    assert math.isnan(study.task_means(groups["pilot"][0])["vqa"])
    (vqa,) = [r for r in study.paired(groups, "pilot", "local") if r["task"] == "vqa"]
    assert math.isnan(vqa["mean"]) and vqa["wins"] == vqa["ties"] == 0
    assert study.main(["--grid", a, "--group-by", "fl.strategy", "--pair", "pilot:local"]) == 0
    assert "| pilot | 1 | nan | nan | nan | 500.0 |" in capsys.readouterr().out


def test_the_item_bootstrap_reads_the_runs_predictions(tmp_path):
    """Per item of the shared task split, A - B averaged over the task's clients (x 100): its
    mean over items and seeds is the paired difference of the task averages."""
    import numpy as np

    a = _grid(tmp_path, "a", "grid:\n  fl.strategy: [pilot, local]\n  run.seed: [0, 1]\n")
    rng = np.random.default_rng(0)
    items = [f"q{i}" for i in range(40)]
    for e in launch.expand(launch.load_grid(a)):
        scores = {}
        folder = os.path.join(e.output_dir, "predictions", "round_000")
        os.makedirs(folder, exist_ok=True)
        for k, task in enumerate(TASKS):
            right = rng.random(len(items)) < (0.8 if "pilot" in e.name else 0.5)
            with open(os.path.join(folder, f"client_{k:02d}.jsonl"), "w") as fh:
                for i, ok in zip(items, right):
                    fh.write(json.dumps({"id": i, "score": float(ok)}) + "\n")
            scores[k] = 100.0 * right.mean()
        os.makedirs(e.output_dir, exist_ok=True)
        clients = [{"client": k, "task": t, "metric": "x", "value": scores[k]} for k, t in enumerate(TASKS)]
        with open(os.path.join(e.output_dir, "metrics.json"), "w") as fh:
            json.dump({"config_hash": e.config_hash, "rounds": [{"round": 0, "clients": clients}],
                       "final": clients}, fh)
    groups = study.collect([(a, "fl.strategy")])
    (vqa,) = [r for r in study.paired(groups, "pilot", "local") if r["task"] == "vqa"]
    boot = vqa["items"]
    assert boot.items == 80 and boot.mean == pytest.approx(vqa["mean"])
    assert boot.low < boot.mean < boot.high and boot.low > 0 and boot.p < 0.01  # 0.8 against 0.5


def test_a_subset_reads_its_values_and_only_its_items(tmp_path, capsys):
    """--subset unseen: the tables take value_unseen, and the item test only the predictions
    rows marked unseen (here every unseen item differs by 100 and every seen one by 0)."""
    a = _grid(tmp_path, "a", "grid:\n  fl.strategy: [pilot, local]\n  run.seed: [0, 1]\n")
    for e in launch.expand(launch.load_grid(a)):
        good = "pilot" in e.name
        folder = os.path.join(e.output_dir, "predictions", "round_000")
        os.makedirs(folder, exist_ok=True)
        for k in range(len(TASKS)):
            with open(os.path.join(folder, f"client_{k:02d}.jsonl"), "w") as fh:
                for i in range(10):
                    unseen = i < 4
                    fh.write(json.dumps({"id": f"q{i}", "subset": "unseen" if unseen else "seen",
                                         "score": float(good or not unseen)}) + "\n")
        clients = [{"client": k, "task": t, "metric": "x", "value": 100.0 if good else 60.0,
                    "value_seen": 100.0, "value_unseen": 100.0 if good else 0.0} for k, t in enumerate(TASKS)]
        with open(os.path.join(e.output_dir, "metrics.json"), "w") as fh:
            json.dump({"config_hash": e.config_hash, "rounds": [{"round": 0, "clients": clients}],
                       "final": clients}, fh)
    groups = study.collect([(a, "fl.strategy")])
    (vqa,) = [r for r in study.paired(study.restrict(groups, "unseen"), "pilot", "local") if r["task"] == "vqa"]
    assert vqa["diffs"] == [100.0, 100.0] and vqa["items"].items == 8 and vqa["items"].mean == pytest.approx(100.0)
    (vqa,) = [r for r in study.paired(study.restrict(groups, "seen"), "pilot", "local") if r["task"] == "vqa"]
    assert vqa["diffs"] == [0.0, 0.0] and vqa["items"].items == 12 and vqa["items"].mean == pytest.approx(0.0)
    (vqa,) = [r for r in study.paired(groups, "pilot", "local") if r["task"] == "vqa"]
    assert vqa["diffs"] == [40.0, 40.0] and vqa["items"].items == 20  # all items: 4 of 10 differ
    assert study.main(["--grid", a, "--group-by", "fl.strategy", "--subset", "unseen", "--pair", "pilot:local"]) == 0
    assert "| pilot - local | vqa | +100.00 | +100.00 |" in capsys.readouterr().out
    assert study.main(["--grid", a, "--group-by", "fl.strategy", "--subset", "rare"]) == 2
    assert "no 'value_rare'" in capsys.readouterr().err


def test_a_group_with_two_runs_of_a_seed_is_refused_and_where_picks_one(tmp_path, capsys):
    g = _grid(tmp_path, "codecs", "grid:\n  fl.strategy: [pilot, fedavg]\n  fl.codec: [float32, int8]\n"
                                  "  run.seed: [0, 1]\n")
    for e in launch.expand(launch.load_grid(g)):
        s = int(e.name[-1])
        base = 70.0 if "pilot" in e.name else 60.0
        _finish(e, {"vqa": base + s - (1.0 if "int8" in e.name else 0.0), "caption": 500.0, "grounding": 10.0})
    with pytest.raises(ConfigError, match=r"group 'float32' of .* has two runs of seed 0: .*pilot.* and .*fedavg.*--where"):
        study.collect([(g, "fl.codec")])
    groups = study.collect([(g, "fl.codec")], where=("fl.strategy=pilot",))
    assert sorted(groups) == ["float32", "int8"]
    assert [groups["float32"][s]["final"][0]["value"] for s in (0, 1)] == [70.0, 71.0]
    (vqa,) = [r for r in study.paired(groups, "int8", "float32") if r["task"] == "vqa"]
    assert vqa["diffs"] == [-1.0, -1.0]
    assert study.main(["--grid", g, "--group-by", "fl.codec", "--where", "fl.strategy=fedavg",
                       "--pair", "int8:float32"]) == 0
    assert "| int8 - float32 | vqa | -1.00 | -1.00 |" in capsys.readouterr().out
    assert study.main(["--grid", g, "--group-by", "fl.codec"]) == 2
