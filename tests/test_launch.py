"""The grid launcher without Slurm: grid files, expansion, the generated array script."""

import os
import sys

import pytest

from helpers import REPO
from pilot_hpc import launch
from pilot_hpc.config import ConfigError


def test_expand_is_the_cartesian_product_with_one_output_dir_each(tmp_path):
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(f"name: g\nconfig: {REPO}/configs/smoke_9client.yaml\noutput_root: {tmp_path}/out\n"
                         "overrides: [fl.rounds=2]\ngrid:\n  run.seed: [0, 1]\n  fl.top_m: [5, 6]\n")
    elements = launch.expand(launch.load_grid(str(grid_file)))
    assert [e.name for e in elements] == ["seed0_top_m5", "seed0_top_m6", "seed1_top_m5", "seed1_top_m6"]
    assert len({e.output_dir for e in elements}) == 4
    assert elements[1].argv[-3:] == ["run.seed=0", "fl.top_m=6", f"run.output_dir={tmp_path}/out/seed0_top_m6"]
    assert "fl.rounds=2" in elements[0].argv


def test_bad_grids_fail_before_submitting(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("name: a\nconfig: configs/smoke_9client.yaml\ngrid: {run.seed: [0]}\nslurms: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['slurms'\]"):
        launch.load_grid(str(bad_key))
    bad_value = tmp_path / "b.yaml"
    bad_value.write_text(f"name: b\nconfig: {REPO}/configs/smoke_9client.yaml\ngrid: {{fl.top_m: [9]}}\n")
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
