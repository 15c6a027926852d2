"""Whole runs of strategy variants: every Pilot switch off, and centralized training."""

import torch

from helpers import SMOKE, load_metrics, run_main, small_overrides


def test_all_switches_off_runs(small_world, cache_dir, tmp_path):
    args = ["--config", SMOKE] + small_overrides(cache_dir, str(tmp_path / "abl")) + [
        "pilot.selection=same_task", "pilot.cross_task=false", "pilot.difference_loss=false",
        "pilot.aux_losses=false", "pilot.cross_init=random", "pilot.keep_client_adapter=true"]
    proc = run_main(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = load_metrics(tmp_path / "abl")
    stage1, final = metrics["rounds"][1]["clients"], metrics["final"]
    assert len(final) == 3
    # NaN (x != x): the switched-off losses were never computed
    assert all(c["diff"] != c["diff"] for c in stage1) and all(c["balance"] != c["balance"] for c in final)


def test_centralized_trains_one_model_on_all_data_and_refuses_several_ranks(small_world, cache_dir, tmp_path):
    from pilot_hpc import checkpoint

    args = ["--config", SMOKE] + small_overrides(cache_dir, str(tmp_path / "c")) + ["fl.strategy=centralized"]
    proc = run_main(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = checkpoint.read(str(tmp_path / "c" / "checkpoints" / "round_002.h5"))
    for k in (1, 2):  # every client holds the one model
        for key, t in ck.clients[0].state.items():
            assert torch.equal(t, ck.clients[k].state[key]), key
    refused = run_main(args[:-1] + ["fl.strategy=centralized", f"run.output_dir={tmp_path / 'c3'}"], np=3,
                       timeout=300)
    assert refused.returncode == 2 and "run it without mpiexec" in refused.stderr
