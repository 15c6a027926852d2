"""tools/ata_choices: ATA's recorded neighbours read back from fake runs, by hand."""

import json
import math
import os

import pytest

from helpers import REPO
from pilot_hpc import launch
from pilot_hpc.tools import ata_choices

pytestmark = pytest.mark.unit

TASKS = ["vqa", "vqa", "caption", "caption"]


def _record(neighbours, distances=None):
    return {"distance": "params", "neighbours": neighbours, **({"distances": distances} if distances else {})}


def _run(e, ata_by_round):
    os.makedirs(e.output_dir, exist_ok=True)
    clients = [{"client": k, "task": t, "metric": "x", "value": 1.0} for k, t in enumerate(TASKS)]
    rounds = [{"round": 0, "clients": clients}]
    rounds += [{"round": r, "clients": clients, **({"ata": a} if a else {})} for r, a in enumerate(ata_by_round, 1)]
    with open(os.path.join(e.output_dir, "metrics.json"), "w") as fh:
        json.dump({"config_hash": e.config_hash, "rounds": rounds, "final": clients}, fh)


def test_shares_separation_and_agreement_by_hand():
    # clients 0, 1 (vqa) at 0 and 1; 2, 3 (caption) at 10 and 12 on a line; client 3 left out
    d = [[0, 1, 10, None], [1, 0, 9, None], [10, 9, 0, None], [None] * 4]
    rec = {"neighbours": [[1], [0], [1], None], "distances": d, "tasks": TASKS}
    assert ata_choices.same_task_share(rec) == pytest.approx(2 / 3)  # 0->1, 1->0 same task; 2->1 not
    # other-task distances 10, 9, 10, 9 (mean 9.5) over same-task 1, 1 (mean 1)
    assert ata_choices.separation(rec) == pytest.approx(9.5)
    assert math.isnan(ata_choices.separation({**rec, "distances": None}))
    other = {"neighbours": [[1], [2], [1], [2]], "tasks": TASKS}
    # clients 0..2 chose in both: 0 same, 1 differs, 2 same
    assert ata_choices.agreement(rec, other) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    two = {"neighbours": [[1, 2], None, None, None]}
    assert ata_choices.agreement(two, {"neighbours": [[2, 3], None, None, None]}) == (0.0, 0.5)


def test_tables_from_grids_and_runs_without_records_named(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: g\nconfig: {REPO}/configs/smoke_9client.yaml\noutput_root: {tmp_path}/grids/g\n"
                    "variants:\n  a: [fl.strategy=pilot]\n  b: [fl.strategy=pilot, pilot.top_m=1]\n"
                    "  c: [fl.strategy=fedavg]\ngrid:\n  run.seed: [0, 1]\n")
    by_name = {e.name: e for e in launch.expand(launch.load_grid(str(grid)))}
    near = [[1], [0], [3], [2]]
    _run(by_name["a_seed0"], [_record(near), _record(near)])
    _run(by_name["a_seed1"], [_record(near), _record(near)])
    _run(by_name["b_seed0"], [_record(near), _record([[2], [0], [3], [2]])])
    _run(by_name["b_seed1"], [_record(near), _record([[2], [3], [0], [1]])])
    _run(by_name["c_seed0"], [None, None])
    assert ata_choices.main(["--grid", str(grid), "--group-by", "variant", "--pair", "b:a"]) == 0
    out = capsys.readouterr().out
    assert "c_seed0 has no ATA records" in out
    assert "| a | 0,1 | 1.00 (1.00-1.00), - | 1.00 (1.00-1.00), - |" in out  # no distances recorded: -
    # round 2 of b: same-task share 3/4 in seed 0 ([2] of client 0 is a caption client), 0/4 in seed 1
    assert "| b | 0,1 | 1.00 (1.00-1.00), - | 0.38 (0.00-0.75), - |" in out
    # b vs a in round 2: seed 0 agrees on clients 1, 2, 3; seed 1 on none
    assert "| 1 | 1.00 (1.00-1.00) | 1.00 (1.00-1.00) |" in out and "| 2 | 0.38 (0.00-0.75) | 0.38 (0.00-0.75) |" in out
    assert ata_choices.main(["--grid", str(grid), "--group-by", "variant", "--pair", "c:a"]) == 2


def test_a_label_of_two_grids_is_read_where_it_has_records(tmp_path, capsys):
    def grid(name, variants):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\nconfig: {REPO}/configs/smoke_9client.yaml\n"
                        f"output_root: {tmp_path}/grids/{name}\nvariants:\n{variants}grid:\n  run.seed: [0]\n")
        return str(path), {e.name: e for e in launch.expand(launch.load_grid(str(path)))}

    old, old_runs = grid("old", "  pilot: [fl.strategy=pilot]\n")
    new, new_runs = grid("new", "  pilot: [fl.strategy=pilot, pilot.top_m=1]\n  other: [fl.strategy=pilot, pilot.top_m=3]\n")
    _run(old_runs["pilot_seed0"], [None])  # before the records
    _run(new_runs["pilot_seed0"], [_record([[1], [0], [3], [2]])])
    _run(new_runs["other_seed0"], [_record([[1], [0], [3], [1]])])
    args = ["--grid", old, "--group-by", "variant", "--grid", new, "--group-by", "variant"]
    assert ata_choices.main(args + ["--pair", "other:pilot"]) == 0
    out = capsys.readouterr().out
    assert "old/pilot_seed0 has no ATA records" in out and "| 1 | 0.75 | 0.75 |" in out
    assert ata_choices.main(["--grid", new, "--group-by", "variant", "--grid", new, "--group-by", "variant"]) == 2
    assert "has records, as a group of an earlier --grid does" in capsys.readouterr().err
