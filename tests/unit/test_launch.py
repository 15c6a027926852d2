"""The grid launcher without Slurm: grid files, expansion, the generated array script."""

import json
import os
import sys

import pytest

from helpers import REPO
from pilot_hpc import launch
from pilot_hpc.config import ConfigError


def test_expand_is_the_cartesian_product_with_one_output_dir_each(tmp_path):
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(f"name: g\nconfig: {REPO}/configs/smoke_9client.yaml\noutput_root: {tmp_path}/out\n"
                         "overrides: [fl.rounds=2]\ngrid:\n  run.seed: [0, 1]\n  pilot.top_m: [5, 6]\n")
    elements = launch.expand(launch.load_grid(str(grid_file)))
    assert [e.name for e in elements] == ["seed0_top_m5", "seed0_top_m6", "seed1_top_m5", "seed1_top_m6"]
    assert len({e.output_dir for e in elements}) == 4
    assert elements[1].argv[-3:] == ["run.seed=0", "pilot.top_m=6", f"run.output_dir={tmp_path}/out/seed0_top_m6"]
    assert "fl.rounds=2" in elements[0].argv


def test_bad_grids_fail_before_submitting(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("name: a\nconfig: configs/smoke_9client.yaml\ngrid: {run.seed: [0]}\nslurms: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['slurms'\]"):
        launch.load_grid(str(bad_key))
    bad_value = tmp_path / "b.yaml"
    bad_value.write_text(f"name: b\nconfig: {REPO}/configs/smoke_9client.yaml\ngrid: {{pilot.top_m: [9]}}\n")
    with pytest.raises(ConfigError, match="must satisfy 1 <= M < K"):
        launch.expand(launch.load_grid(str(bad_value)))


def test_generated_array_script_is_pinned(tmp_path):
    grid = launch.load_grid(os.path.join(REPO, "configs", "grids", "smoke_seeds.yaml"))
    text = launch.sbatch_text(grid).replace(grid.output_root, "<output_root>").replace(sys.executable, "<python>")
    golden = os.path.join(REPO, "tests", "golden", "smoke_seeds.sbatch")
    if os.environ.get("PILOT_HPC_UPDATE_GOLDEN"):
        with open(golden, "w") as fh:
            fh.write(text)
    with open(golden) as fh:
        assert text == fh.read()


def _doc(values):
    clients = [{"client": i, "task": t, "metric": "vqa_accuracy", "value": v}
               for i, (t, v) in enumerate(zip(["vqa", "vqa", "caption"], values))]
    return {"rounds": [{"round": 0, "clients": clients}, {"round": 1, "clients": clients}], "final": clients}


def test_collect_groups_by_an_axis_with_mean_and_std(tmp_path):
    import json

    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(f"name: g\nconfig: {REPO}/configs/smoke_9client.yaml\noutput_root: {tmp_path}/out\n"
                         "grid:\n  fl.strategy: [pilot, fedavg]\n  run.seed: [0, 1]\n")
    grid = launch.load_grid(str(grid_file))
    elements = launch.expand(grid)
    values = {"strategypilot_seed0": [10, 20, 30], "strategypilot_seed1": [30, 40, 50],
              "strategyfedavg_seed0": [0, 0, 0]}
    for e in elements:
        if e.name in values:
            os.makedirs(e.output_dir)
            with open(os.path.join(e.output_dir, "metrics.json"), "w") as fh:
                json.dump(_doc(values[e.name]), fh)
    table = launch.collect(grid, elements, "fl.strategy")
    pilot = next(line for line in table.splitlines() if line.startswith("| pilot"))
    # client 0: mean(10, 30) = 20 +- 10; vqa average per run: 15 and 35 -> 25 +- 10; caption 40 +- 10
    assert pilot == "| pilot | 2 | 20.0 ± 10.0 | 30.0 ± 10.0 | 40.0 ± 10.0 | 25.0 ± 10.0 | 40.0 ± 10.0 |"
    assert "| fedavg | 1 | 0.0 |" in table and "strategyfedavg_seed1" in table  # missing run named
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="not an axis"):
        launch.collect(grid, elements, "pilot.top_m")


def test_variants_cross_the_axes_and_group_like_an_axis(tmp_path):
    grid_file = tmp_path / "v.yaml"
    grid_file.write_text(f"name: v\nconfig: {REPO}/configs/smoke_9client.yaml\noutput_root: {tmp_path}/out\n"
                         "variants:\n  nothing: [pilot.cross_task=false, pilot.aux_losses=false]\n  full: []\n"
                         "grid:\n  run.seed: [0, 1]\n")
    grid = launch.load_grid(str(grid_file))
    elements = launch.expand(grid)
    assert [e.name for e in elements] == ["nothing_seed0", "nothing_seed1", "full_seed0", "full_seed1"]
    assert "pilot.cross_task=false" in elements[0].argv and "pilot.cross_task=false" not in elements[2].argv
    for e in elements[:3]:  # fake finished runs: two of "nothing", one of "full"
        os.makedirs(e.output_dir)
        doc = {"config_hash": launch.load_config(e.argv[1], e.argv[2:]).hash(), "rounds": [], "final": [
            {"client": k, "task": t, "metric": "x", "value": float(len(e.name) + k)}
            for k, t in enumerate(["vqa"] * 3 + ["caption"] * 3 + ["grounding"] * 3)]}
        doc["rounds"] = [{"round": 0, "clients": doc["final"]}]
        with open(os.path.join(e.output_dir, "metrics.json"), "w") as fh:
            json.dump(doc, fh)
    assert [launch.finished(e) for e in elements] == [True, True, True, False]
    table = launch.collect(grid, elements, "variant")
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()[2:] if line.startswith("|")}
    assert "full_seed1" in table  # named as missing
    assert rows == {"nothing": "2", "full": "1"}  # runs per group


def test_a_run_with_another_config_is_not_finished(tmp_path):
    grid_file = tmp_path / "s.yaml"
    grid_file.write_text(f"name: s\nconfig: {REPO}/configs/smoke_9client.yaml\noutput_root: {tmp_path}/out\n"
                         "grid:\n  run.seed: [0]\n")
    (e,) = launch.expand(launch.load_grid(str(grid_file)))
    os.makedirs(e.output_dir)
    with open(os.path.join(e.output_dir, "metrics.json"), "w") as fh:
        json.dump({"config_hash": "something-else"}, fh)
    assert not launch.finished(e)


def _finish(e, value=1.0):
    """A fake finished run of element e: a metrics.json with its config hash."""
    os.makedirs(e.output_dir, exist_ok=True)
    clients = [{"client": k, "task": t, "metric": "x", "value": value}
               for k, t in enumerate(["vqa"] * 3 + ["caption"] * 3 + ["grounding"] * 3)]
    with open(os.path.join(e.output_dir, "metrics.json"), "w") as fh:
        json.dump({"config_hash": e.config_hash, "rounds": [{"round": 0, "clients": clients}], "final": clients}, fh)


def test_a_run_finished_by_a_sibling_grid_with_the_same_config_is_reused_not_rerun(tmp_path):
    """Two tables of one study share a row (here pilot.top_m=6, the default, in a grid that
    does not name top_m): the second grid reuses the first's run; a different config
    (top_m=5) or a grid outside the study's folder is not reused."""
    cfg = f"{REPO}/configs/smoke_9client.yaml"
    (tmp_path / "a.yaml").write_text(f"name: a\nconfig: {cfg}\noutput_root: {tmp_path}/study/a\n"
                                     "grid:\n  fl.strategy: [pilot]\n  run.seed: [0]\n")
    (tmp_path / "b.yaml").write_text(f"name: b\nconfig: {cfg}\noutput_root: {tmp_path}/study/b\n"
                                     "grid:\n  pilot.top_m: [5, 6]\n  run.seed: [0]\n")
    (tmp_path / "c.yaml").write_text(f"name: c\nconfig: {cfg}\noutput_root: {tmp_path}/elsewhere/c\n"
                                     "grid:\n  pilot.top_m: [6]\n  run.seed: [0]\n")
    (a,) = launch.expand(launch.load_grid(str(tmp_path / "a.yaml")))
    _finish(a, 42.0)
    grid_b = launch.load_grid(str(tmp_path / "b.yaml"))
    m5, m6 = launch.expand(grid_b)
    assert not launch.finished(m6)
    assert launch.reuse_equivalent(grid_b, m5) is None  # another configuration
    assert launch.reuse_equivalent(grid_b, m6) == a.output_dir
    assert launch.finished(m6) and launch.result_dir(m6) == a.output_dir
    assert "| 42.0" in launch.collect(grid_b, [m6], None)
    grid_c = launch.load_grid(str(tmp_path / "c.yaml"))
    assert launch.reuse_equivalent(grid_c, launch.expand(grid_c)[0]) is None  # not a sibling folder
    # The reused run changes (rerun with another config): the element is no longer finished.
    with open(os.path.join(a.output_dir, "metrics.json"), "w") as fh:
        json.dump({"config_hash": "changed"}, fh)
    assert not launch.finished(m6)


def test_the_grid_command_runs_nothing_when_every_run_is_reused(tmp_path, capsys):
    cfg = f"{REPO}/configs/smoke_9client.yaml"
    (tmp_path / "a.yaml").write_text(f"name: a\nconfig: {cfg}\noutput_root: {tmp_path}/study/a\n"
                                     "grid:\n  run.seed: [0, 1]\n")
    (tmp_path / "b.yaml").write_text(f"name: b\nconfig: {cfg}\noutput_root: {tmp_path}/study/b\n"
                                     "grid:\n  pilot.ct_clip: [false]\n  run.seed: [0, 1]\n")
    for e in launch.expand(launch.load_grid(str(tmp_path / "a.yaml"))):
        _finish(e)
    assert launch.main(["--grid", str(tmp_path / "b.yaml"), "--local", "--group-by", "pilot.ct_clip"]) == 0
    out = capsys.readouterr().out
    assert out.count("reuses") == 2 and "runs without metrics.json" not in out
    assert launch.main(["--grid", str(tmp_path / "b.yaml"), "--local"]) == 0  # the rerun: both finished
    assert "2 of 2 runs already finished" in capsys.readouterr().out


def test_local_ranks_and_parallel_override_the_grid(tmp_path, monkeypatch, capsys):
    """--ranks sets every run's mpiexec -n, --parallel how many run at once; both only with --local."""
    import threading

    cfg = f"{REPO}/configs/smoke_9client.yaml"
    (tmp_path / "g.yaml").write_text(f"name: g\nconfig: {cfg}\noutput_root: {tmp_path}/g\n"
                                     "grid:\n  run.seed: [0, 1, 2]\nslurm:\n  ntasks: 9\n")
    seen, lock, live, peak = [], threading.Lock(), [0], [0]

    class Done:
        returncode = 0

    def fake_run(cmd, **kw):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            seen.append(cmd)
        threading.Event().wait(0.2)  # long enough for a second worker to start if there is one
        with lock:
            live[0] -= 1
        return Done()

    monkeypatch.setattr(launch, "find_mpiexec", lambda: "mpiexec")
    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    assert launch.main(["--grid", str(tmp_path / "g.yaml"), "--local", "--ranks", "1", "--parallel", "2"]) == 0
    assert len(seen) == 3 and all(cmd[:3] == ["mpiexec", "-n", "1"] for cmd in seen)
    assert peak[0] == 2
    seen.clear()
    peak[0] = 0
    for e in launch.expand(launch.load_grid(str(tmp_path / "g.yaml"))):  # nothing was written: all rerun
        assert not launch.finished(e)
    assert launch.main(["--grid", str(tmp_path / "g.yaml"), "--local"]) == 0  # the grid's own: 9 ranks, one at once
    assert len(seen) == 3 and all(cmd[:3] == ["mpiexec", "-n", "9"] for cmd in seen) and peak[0] == 1
    assert launch.main(["--grid", str(tmp_path / "g.yaml"), "--dry-run", "--ranks", "1"]) == 2
    assert "apply to --local runs only" in capsys.readouterr().err
