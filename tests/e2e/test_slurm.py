"""Slurm for real: a single-node slurmctld + slurmd on localhost (tests/e2e/slurm_cluster.py),
`sbatch slurm/fedmit_9client.sbatch`, grids as submitit job arrays, and a requeue.

The Debian packages come from `make test`; without them these tests skip with a reason.
"""

import os
import shlex
import subprocess
import sys

import pytest

from helpers import REPO, SMOKE, load_metrics, small_overrides
from pilot_hpc import checkpoint
from slurm_cluster import LocalSlurm, missing_tools

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason=f"Slurm tools missing: {missing_tools()} "
                                "(make test installs slurm-wlm and munge)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(str(tmp_path_factory.mktemp("slurm"))).start()
    yield cluster
    cluster.stop()


def job_env(cluster, **extra):
    """sbatch exports this environment to the job: the venv's python and mpiexec first."""
    bin_dir = os.path.dirname(sys.executable)
    return dict(cluster.env, PATH=f"{bin_dir}:{os.environ['PATH']}", **extra)


def test_sbatch_script_runs_the_federation_like_mpiexec(slurm, runs, cache_dir, tmp_path):
    out = tmp_path / "sbatch_run"
    proc = subprocess.run(
        ["sbatch", "--wait", "-n", "3", os.path.join(REPO, "slurm", "fedmit_9client.sbatch")]
        + small_overrides(cache_dir, str(out)),
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=job_env(slurm, CONFIG=SMOKE))
    assert proc.returncode == 0, proc.stdout + proc.stderr + slurm.logs()
    assert load_metrics(out)["final"] == load_metrics(runs[0] / "w3")["final"]


def test_a_wrong_pmi_plugin_is_refused(slurm, cache_dir, tmp_path):
    """srun without --mpi=pmi2 starts N one-rank worlds: main must refuse, not train N times."""
    out = tmp_path / "one_rank_worlds"
    cmd = shlex.join(["srun", "--mpi=none", sys.executable, "-m", "pilot_hpc.main", "--config", SMOKE]
                     + small_overrides(cache_dir, str(out)))
    log = tmp_path / "job.out"
    proc = subprocess.run(["sbatch", "--wait", "-n", "3", "-o", str(log), "--wrap", cmd], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=job_env(slurm))
    assert proc.returncode != 0
    assert "the MPI world has 1 rank(s) but this Slurm step started 3 tasks" in log.read_text()
    assert not (out / "checkpoints").exists()


def write_grid(tmp_path, cache_dir, name, seeds):
    overrides = [o for o in small_overrides(cache_dir, "x") if not o.startswith("run.output_dir")]
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nconfig: {SMOKE}\noutput_root: {tmp_path / name}\n"
        f"overrides: {overrides!r}\n".replace("'", '"') +
        f"grid:\n  run.seed: {seeds!r}\nslurm:\n  ntasks: 3\n  time_min: 10\n  array_parallelism: 2\n"
        "  signal_delay_s: 30\n")
    return str(path)


def launch_cli(args, cluster, timeout, **extra):
    return subprocess.run([sys.executable, "-m", "pilot_hpc.launch"] + args, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=job_env(cluster, **extra))


def test_grid_runs_as_a_slurm_array_and_collect_prints_the_table(slurm, runs, cache_dir, tmp_path):
    grid = write_grid(tmp_path, cache_dir, "seeds", [0, 1])
    proc = launch_cli(["--grid", grid, "--wait"], slurm, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_ids = [line.split("Slurm job ")[1].split()[0] for line in proc.stdout.splitlines() if "Slurm job" in line]
    assert len(job_ids) == 2 and all("_" in j for j in job_ids)  # array elements: <array id>_<index>
    assert job_ids[0].split("_")[0] == job_ids[1].split("_")[0]
    collected = launch_cli(["collect", "--grid", grid], slurm, timeout=60)
    assert collected.returncode == 0
    rows = [line for line in collected.stdout.splitlines() if line.startswith("| seed")]
    assert len(rows) == 2
    assert load_metrics(tmp_path / "seeds" / "seed0")["final"] == load_metrics(runs[0] / "w3")["final"]


def test_preempted_element_is_requeued_and_resumes(slurm, runs, cache_dir, tmp_path):
    """USR2 (Slurm's warning signal) on one rank in the first run only (restart=0)."""
    grid = write_grid(tmp_path, cache_dir, "requeue", [0])
    proc = launch_cli(["--grid", grid, "--wait"], slurm, timeout=900,
                      PILOT_HPC_INJECT="sigusr2:rank=1,round=2,step=1,restart=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    element = tmp_path / "requeue" / "seed0"
    logs = "".join(p.read_text() for p in (tmp_path / "requeue" / "submitit").rglob("*_0_log.out"))
    assert "pilot_hpc: preempted; requeueing job" in logs
    assert "interrupted mid-round" in logs  # the rerun resumed inside round 2
    assert [os.path.basename(p) for p, _, _ in checkpoint.candidates(str(element / "checkpoints"))] == \
        ["round_002.h5", "round_001.h5"]
    assert load_metrics(element)["final"] == load_metrics(runs[0] / "w3")["final"]
