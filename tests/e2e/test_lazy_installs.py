"""Lazy installs (fl/installs.py) and the round checkpoint that copies unchanged clients:
a sampled run whose sitting-out clients install the broadcast rows only when next hosted
is bitwise the run that installs them every round, and a run preempted while installs are
pending resumes bitwise. One client of three takes part per round and only participants
are evaluated, so clients go several rounds without training (their checkpoint groups
then link to an earlier round's file), and export installs what the last one lacks."""

import os

import pytest
import torch

from helpers import args_for, load_metrics, run_main
from pilot_hpc import checkpoint
from pilot_hpc.fl.installs import EAGER_ENV

LAZY = ["fl.rounds=4", "fl.clients_per_round=1", "fl.eval_clients=participants"]


@pytest.fixture(scope="module")
def lazy_and_eager(small_world, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lazy")
    lazy = run_main(args_for(cache_dir, out / "lazy") + LAZY, timeout=600)
    assert lazy.returncode == 0, lazy.stdout[-3000:] + lazy.stderr[-3000:]
    eager = run_main(args_for(cache_dir, out / "eager") + LAZY, timeout=600, env={EAGER_ENV: "1"})
    assert eager.returncode == 0, eager.stdout[-3000:] + eager.stderr[-3000:]
    return out


def _exported(run, k, out):
    """Client k's model after round 3 as pilot_hpc.export writes it: every tensor of its
    safetensors files."""
    from safetensors.torch import load_file

    from pilot_hpc.export import export_client

    export_client(str(run), k, str(out), round_=3)
    return {f"{os.path.relpath(os.path.join(d, name), out)}:{key}": t for d, _, names in os.walk(out)
            for name in names if name.endswith(".safetensors") for key, t in load_file(os.path.join(d, name)).items()}


def test_lazy_installs_give_the_eager_run_bitwise(lazy_and_eager, tmp_path):
    out = lazy_and_eager
    ref, got = load_metrics(out / "eager"), load_metrics(out / "lazy")
    assert got["rounds"] == ref["rounds"] and got["final"] == ref["final"]
    # After round 3 a client that sat rounds out (evaluated or not) still lacks their rows:
    # the file holds them (/installs), and export installs them. The last round's
    # evaluation (everyone) leaves every client installed in round 4's file.
    lazy = checkpoint.read(str(out / "lazy" / "checkpoints" / "round_003.h5"))
    assert lazy.installs is not None and any(c.installed < 3 for c in lazy.clients.values())
    last = checkpoint.read(str(out / "lazy" / "checkpoints" / "round_004.h5"))
    assert all(c.installed == 4 for c in last.clients.values())
    assert checkpoint.read(str(out / "eager" / "checkpoints" / "round_003.h5")).installs is None
    for k in range(3):
        a, b = _exported(out / "lazy", k, tmp_path / f"lazy{k}"), _exported(out / "eager", k, tmp_path / f"eager{k}")
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), (k, key)


def test_a_run_preempted_with_installs_pending_resumes_bitwise(lazy_and_eager, cache_dir, tmp_path):
    out = lazy_and_eager
    run = tmp_path / "preempted"
    args = args_for(cache_dir, run) + LAZY
    proc = run_main(args, timeout=300, env={"PILOT_HPC_INJECT": "sigterm:rank=0,round=4,step=2"})
    assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-2000:]
    again = run_main(args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "interrupted mid-round" in again.stdout
    ref, got = load_metrics(out / "lazy"), load_metrics(run)
    assert got["rounds"] == ref["rounds"] and got["final"] == ref["final"]
