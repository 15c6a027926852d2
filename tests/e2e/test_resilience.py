"""Faults under real mpiexec (subprocesses with timeouts): kills, preemption, corrupt
checkpoints, bad updates, exceptions, and a changed config on resume.

Each resumed run must end with exactly the uninterrupted run's metrics (bitwise on CPU).
"""

import json
import os
import shutil
import time

import h5py
import pytest
import torch

from helpers import args_for, assert_same_result, run_main
from pilot_hpc import checkpoint
from pilot_hpc.checkpoint import Status


def test_sigkill_of_a_rank_ends_the_job_and_the_rerun_resumes(runs, cache_dir, tmp_path):
    out = tmp_path / "killed"
    t0 = time.monotonic()
    proc = run_main(args_for(cache_dir, out), np=3, timeout=120,
                    env={"PILOT_HPC_INJECT": "sigkill:rank=1,round=2,step=1"})
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and elapsed < 60, (proc.returncode, elapsed)
    assert (out / "checkpoints" / "round_001.h5").exists()
    assert not (out / "checkpoints" / "round_002.h5").exists()
    again = run_main(args_for(cache_dir, out), np=3, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing from" in again.stdout and "round_001.h5" in again.stdout
    assert "round 0/" not in again.stdout  # nothing before the checkpoint is redone
    assert_same_result(out, runs)


def test_sigterm_mid_round_checkpoints_exits_75_and_resumes_bitwise(runs, cache_dir, tmp_path):
    out = tmp_path / "preempted"
    proc = run_main(args_for(cache_dir, out), np=3, timeout=300,
                    env={"PILOT_HPC_INJECT": "sigterm:rank=2,round=2,step=2"})
    assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "got SIGTERM" in proc.stderr
    path = out / "checkpoints" / "round_002.preempt.h5"
    ck = checkpoint.read(str(path))
    assert not ck.complete and ck.round == 2
    c2 = ck.clients[2]
    assert c2.status is Status.PARTIAL and c2.progress.step == 2 and c2.progress.optimizer
    again = run_main(args_for(cache_dir, out), np=3, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "interrupted mid-round" in again.stdout
    assert not path.exists()  # superseded by the completed round
    assert_same_result(out, runs)


# history: digits changed inside the `history` attribute, written back consistently through
# HDF5 (so no HDF5 checksum can see it): only the whole-file digest catches it; without it
# the file loads and metrics.json reports round 2's caption CIDEr as 99.29 instead of 11.29.
@pytest.mark.parametrize("damage", ["truncate", "flip", "history"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(runs, cache_dir, tmp_path, damage):
    out = tmp_path / damage
    shutil.copytree(runs[0] / "w3", out)
    os.remove(out / "metrics.json")
    newest = out / "checkpoints" / "round_002.h5"
    if damage == "truncate":
        with open(newest, "r+b") as fh:
            fh.truncate(os.path.getsize(newest) // 3)
    elif damage == "history":
        with h5py.File(newest, "a") as f:
            history = json.loads(f.attrs["history"])
            history[-1]["clients"][1]["value"] = 99.29  # the caption client's CIDEr
            f.attrs["history"] = json.dumps(history)
    else:
        with h5py.File(newest, "r") as f:
            offset = f["clients/client_01/state"][next(iter(f["clients/client_01/state"]))].id.get_chunk_info(0).byte_offset
        raw = bytearray(newest.read_bytes())
        for i in range(16):
            raw[offset + 8 + i] ^= 0x5A
        newest.write_bytes(bytes(raw))
    proc = run_main(args_for(cache_dir, out), np=3, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping" in proc.stdout and "round_002.h5" in proc.stdout
    assert "continuing from" in proc.stdout and "round_001.h5" in proc.stdout
    assert_same_result(out, runs)
    # Redoing round 2 did not overwrite the damaged file: it is kept as it was found.
    assert (out / "checkpoints" / "unusable" / "round_002.h5").exists()


def test_nan_update_is_excluded_and_the_client_keeps_its_parameters(runs, cache_dir, tmp_path):
    out = tmp_path / "nan"
    proc = run_main(args_for(cache_dir, out), np=3, timeout=300,
                    env={"PILOT_HPC_INJECT": "nan_update:client=1,round=2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "client 1: non-finite update in round 2" in proc.stdout + proc.stderr
    assert "client(s) [1] excluded from aggregation" in proc.stdout
    before = checkpoint.read(str(out / "checkpoints" / "round_001.h5")).clients[1].state
    after = checkpoint.read(str(out / "checkpoints" / "round_002.h5")).clients[1].state
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(torch.isfinite(t.float()).all() for t in after.values())


@pytest.mark.parametrize("strategy,np_,how", [
    # Pilot's round 2 is stage 2: every client's first step at lr = inf makes its update NaN.
    ("pilot", 3, {"overrides": ["train.lr_stage2=.inf"]}),
    # local exchanges nothing, so only the stop vote can notice that nobody trained.
    ("local", None, {"env": {"PILOT_HPC_INJECT": ";".join(f"nan_update:client={k},round=2" for k in range(3))}}),
])
def test_a_round_where_every_update_is_non_finite_exits_1_keeping_the_last_checkpoint(cache_dir, tmp_path, strategy,
                                                                                       np_, how):
    out = tmp_path / strategy
    proc = run_main(args_for(cache_dir, out) + [f"fl.strategy={strategy}"] + how.get("overrides", []), np=np_,
                    timeout=300, env=how.get("env"))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "aborting the MPI job" not in proc.stderr  # a clean stop on every rank
    newest = out / "checkpoints" / "round_001.h5"
    assert proc.stderr.count("pilot_hpc: error: round 2: the update of every client ([0, 1, 2]) was non-finite") == 1
    assert "Lower the learning rate (train.lr_stage2=" in proc.stderr and "or check the clients' data" in proc.stderr
    assert f"{newest} is still the newest checkpoint" in proc.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["round_001.h5"]  # nothing written for round 2
    assert not (out / "metrics.json").exists()
    ck = checkpoint.read(str(newest))
    assert ck.complete and ck.round == 1 and all(c.finite for c in ck.clients.values())


def test_an_exception_on_one_rank_aborts_the_job_naming_rank_and_client(cache_dir, tmp_path):
    t0 = time.monotonic()
    proc = run_main(args_for(cache_dir, tmp_path / "boom"), np=3, timeout=120,
                    env={"PILOT_HPC_INJECT": "raise:client=2,round=1"})
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    assert "rank 2, client 2: RuntimeError: injected failure" in proc.stderr
    # The aborting rank unlinked its node's MPICH segment (rank 0 recorded its name).
    segments = json.loads((tmp_path / "boom" / ".pilot_hpc.lock").read_text())["shm_segments"]
    assert segments and all(s.startswith("/dev/shm/mpich_shm_") for s in segments), segments
    assert not any(os.path.exists(s) for s in segments), segments


def _tree(folder) -> dict:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files if f != ".pilot_hpc.lock"}


# model.lora_r changes the shapes too: unless the config is compared first, both
# checkpoints look "unusable" and the run starts over, overwriting them.
@pytest.mark.parametrize("change, shown", [(["train.lr_stage2=1.0e-3"], "train.lr_stage2: 0.0005 -> 0.001"),
                                           (["model.lora_r=4"], "model.lora_r: 8 -> 4")])
def test_resume_with_a_result_changing_config_is_refused(runs, cache_dir, tmp_path, change, shown):
    out = tmp_path / "changed"
    shutil.copytree(runs[0] / "w3", out)
    before = _tree(out)
    proc = run_main(args_for(cache_dir, out) + change + ["run.log_every=7"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert shown in proc.stderr and "run.restart=true" in proc.stderr
    assert "log_every" not in proc.stderr  # not a result-changing field
    assert _tree(out) == before  # the earlier run's files, byte for byte
