"""Every baseline strategy gives the same results with one rank and under mpiexec -n 3."""

import pytest

from helpers import SMOKE, load_metrics, run_main, small_overrides


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "shepherd", "feddpa", "local"])
def test_strategy_runs_alike_with_one_and_three_ranks(strategy, small_world, cache_dir, tmp_path):
    args = ["--config", SMOKE] + small_overrides(cache_dir, "x") + [f"fl.strategy={strategy}"]
    one = run_main(args + [f"run.output_dir={tmp_path / 'w1'}"], timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    three = run_main(args + [f"run.output_dir={tmp_path / 'w3'}"], np=3, timeout=600)
    assert three.returncode == 0, three.stderr[-3000:]
    a, b = load_metrics(tmp_path / "w1"), load_metrics(tmp_path / "w3")
    assert a["strategy"] == strategy and a["final"] == b["final"]
