"""Nothing lost, nothing silent: bad values refused at the boundary (exit 2, the key
named, before torch or MPI load) while a bug stays a bug (exit 1, traceback), one job
per output folder, Ctrl-C handled like SIGTERM, an unwritable checkpoint folder found
before training, data-file shapes, and MPICH shared-memory segments of an aborted job
cleaned up by the next start."""

import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import REPO, SMOKE, args_for, assert_same_result, mpiexec, run_main
from pilot_hpc import runlock
from pilot_hpc.errors import DataError


# ---------------------------------------------------------------- values at the boundary
@pytest.mark.parametrize("override,message", [
    ("fl.bogus=1", "override 'fl.bogus=1': unknown key fl.bogus"),
    ("fl.strategy=fedavgg", "fl.strategy must be one of pilot, fedavg"),
    ("pilot.top_m=9", "must satisfy 1 <= M < K"),
    ("train.lr_stage1=-1", "train.lr_stage1 must be > 0, got -1.0"),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("train.local_epochs=0", "train.local_epochs must be >= 1, got 0"),
    ("model.patch_size=0", "model.patch_size must be >= 1, got 0"),
    ("fedadam.beta1=1.5", "fedadam.beta1 must lie in [0, 1), got 1.5"),
    ("model.path=/nonexistent/llava-1.5-7b-hf", "model.path '/nonexistent/llava-1.5-7b-hf' is not a folder"),
])
def test_bad_values_exit_2_naming_the_key_before_anything_is_written(tmp_path, override, message):
    out = tmp_path / "out"
    proc = run_main(["--config", SMOKE, f"run.output_dir={out}", f"run.cache_dir={tmp_path}", override], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stderr.count("config error") == 1 and "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_model_folder_lacking_files_names_what_it_needs(tmp_path):
    model = tmp_path / "llava"
    model.mkdir()
    (model / "config.json").write_text("{}")
    proc = run_main(["--config", SMOKE, f"run.output_dir={tmp_path / 'out'}", f"model.path={model}"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "lacks a tokenizer, an image preprocessor" in proc.stderr


def test_config_errors_come_before_torch_and_mpi_are_imported():
    code = ("import sys; from pilot_hpc import main; "
            f"rc = main.cli(['--config', {SMOKE!r}, 'train.batch_size=0']); "
            "print('rc', rc, 'heavy', sorted(m for m in ('torch', 'mpi4py', 'transformers', 'h5py', 'datasets', "
            "'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "rc 2 heavy []" in proc.stdout, proc.stdout + proc.stderr


def test_under_mpiexec_only_rank_0_reports_a_config_error(tmp_path):
    proc = run_main(["--config", SMOKE, f"run.output_dir={tmp_path / 'out'}", "train.batch_size=0"], np=3,
                    timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("train.batch_size must be >= 1") == 1


def test_cuda_without_a_gpu_is_bad_input(cache_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: run.device=cuda is valid here")
    proc = run_main(args_for(cache_dir, tmp_path / "cuda") + ["run.device=cuda"], timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "run.device=cuda but no CUDA device is visible" in proc.stderr and "Traceback" not in proc.stderr


def test_a_value_error_in_the_model_build_is_a_bug_not_bad_input(cache_dir, tmp_path):
    """Exit 2 is for pilot_hpc.errors.BadInput (and OSError on the user's files) only: a
    plain ValueError raised while the model is built is a bug, so exit 1 with its
    traceback, and no "error:" line that would blame the input."""
    proc = run_main(args_for(cache_dir, tmp_path / "bug"), timeout=300, env={"PILOT_HPC_INJECT": "raise_build:rank=0"})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert "pilot_hpc: rank 0: ValueError: injected failure (PILOT_HPC_INJECT) in the model build" in proc.stderr
    assert "pilot_hpc: error:" not in proc.stderr and "round 0/" not in proc.stdout


def test_a_grid_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, capsys):
    from pilot_hpc import launch

    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nconfig: c.yaml\ngrid:\n  fl.rounds: [1, 2\n  x: 3\n")
    assert launch.main(["--grid", str(grid), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{grid}:5:4: not valid YAML: expected ',' or ']', but got ':'" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_too_little_room_for_one_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    import torch

    from pilot_hpc import main
    from pilot_hpc.config import load_config

    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path / 'out'}"])
    state = {"w": torch.zeros(1024, 256)}  # 1 MiB per client: 4 x 9 x 1 MiB needed
    real = os.statvfs

    class Nearly:
        f_frsize, f_bavail = 4096, 256  # 1 MiB free

    assert main.check_writable(cfg, state, 9)
    monkeypatch.setattr(os, "statvfs", lambda path: Nearly() if str(tmp_path) in str(path) else real(path))
    assert not main.check_writable(cfg, state, 9)
    assert "has 1.0 MiB free but one checkpoint needs about 36.0 MiB" in capsys.readouterr().err


# ---------------------------------------------------------------- data files
def _image(folder):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(folder / "a.png")


RECORD = {"id": "r0", "image": "a.png",
          "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]}


def test_a_data_file_with_one_record_object_is_refused(tmp_path):
    from pilot_hpc.data.records import load_records

    _image(tmp_path)
    one = tmp_path / "one.json"
    one.write_text(json.dumps(RECORD, indent=1))
    with pytest.raises(DataError, match=r"one.json: the file holds one record object, not a list of records"):
        load_records(str(one))
    lines = tmp_path / "lines.json"  # JSON Lines: one record per line still loads
    lines.write_text(json.dumps(RECORD) + "\n" + json.dumps(dict(RECORD, id="r1")) + "\n")
    assert [s.id for s in load_records(str(lines), cache_dir=str(tmp_path / "c"))] == ["r0", "r1"]


def test_image_token_twice_in_one_turn_is_refused(tmp_path):
    from pilot_hpc.data.records import parse_record

    _image(tmp_path)
    rec = json.loads(json.dumps(RECORD))
    rec["conversations"][0]["value"] = "<image>\n<image>\nWhat is it?"
    with pytest.raises(DataError, match=r"f.json: record 3 \(id 'r0'\): <image> appears 2 times"):
        parse_record(rec, "f.json", 3, str(tmp_path))


# ---------------------------------------------------------------- MPICH segments
def test_segments_left_by_the_folders_previous_job_are_removed_but_never_a_live_one(tmp_path):
    tag = f"{os.getpid():x}"
    left, live = f"/dev/shm/mpich_shm_test{tag}_0", f"/dev/shm/mpich_shm_test{tag}_1"
    for path in (left, live):
        with open(path, "wb") as fh:
            fh.write(b"\0" * 4096)
    try:
        with open(live, "r+b") as fh, mmap.mmap(fh.fileno(), 4096):  # a live job maps it
            (tmp_path / runlock.LOCK_NAME).write_text(json.dumps(
                {"host": os.uname().nodename, "pid": 1, "shm_segments": [left, live, "/etc/passwd"]}))
            lock = runlock.RunLock(str(tmp_path)).acquire()
            assert lock.clean_previous() == [left]
            assert not os.path.exists(left) and os.path.exists(live) and os.path.exists("/etc/passwd")
    finally:
        for path in (left, live):
            if os.path.exists(path):
                os.remove(path)


# ---------------------------------------------------------------- whole runs
def test_unwritable_checkpoint_folder_is_refused_before_training(cache_dir, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:
        (out / "checkpoints").mkdir(mode=0o555)
    else:  # root writes through permission bits: point the folder where the kernel refuses files
        os.symlink("/sys/kernel", out / "checkpoints")
    proc = run_main(args_for(cache_dir, out), np=3, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{out}/checkpoints cannot be written" in proc.stderr
    assert "round 0/" not in proc.stdout and "Traceback" not in proc.stderr


def test_a_second_ctrl_c_aborts_at_once_without_a_checkpoint(cache_dir, tmp_path):
    out = tmp_path / "twice"
    cmd = [sys.executable, "-m", "pilot_hpc.main"] + args_for(cache_dir, out)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The lock file appears once the handlers are installed and before torch and
        # transformers load: seconds before any step (a first Ctrl-C during training would
        # checkpoint and exit before the second one).
        deadline = time.monotonic() + 120
        while not (out / runlock.LOCK_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.5)  # more than main.SIGINT_REPEAT_S: a second Ctrl-C, not the same one twice
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "got SIGINT" in err and "second SIGINT: aborting now, without a checkpoint" in err
    assert not (out / "checkpoints").exists() or not os.listdir(out / "checkpoints")


def test_a_second_job_in_the_folder_is_refused_and_ctrl_c_checkpoints_and_resumes_bitwise(runs, cache_dir,
                                                                                          tmp_path):
    out = tmp_path / "ctrl_c"
    cmd = [mpiexec(), "-n", "3", sys.executable, "-m", "pilot_hpc.main"] + args_for(cache_dir, out)
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, MPIEXEC_TIMEOUT="300"))
    lines, seen = [], {"round 0/": threading.Event(), "round 1/": threading.Event()}

    def read():
        for line in first.stdout:
            lines.append(line)
            for mark, event in seen.items():
                if mark in line:
                    event.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen["round 0/"].wait(240), "".join(lines)[-2000:]
        second = run_main(args_for(cache_dir, out), np=3, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"run.output_dir {out} is in use by another job (held by pid" in second.stderr
        assert seen["round 1/"].wait(240), "".join(lines)[-2000:]
        first.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends mpiexec, which forwards it
        err = first.communicate(timeout=240)[1]
    finally:
        if first.poll() is None:
            first.kill()
    reader.join(10)
    assert first.returncode == 75, "".join(lines)[-2000:] + err[-2000:]
    assert "got SIGINT" in err and "KeyboardInterrupt" not in err
    assert (out / "checkpoints" / "round_002.preempt.h5").exists()
    again = run_main(args_for(cache_dir, out), np=3, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "interrupted mid-round" in again.stdout
    assert_same_result(out, runs)


def test_a_bad_image_at_run_time_is_skipped_and_counted_or_stops_with_a_checkpoint(small_world, tmp_path):
    """data.verify_images=false, one record's image undecodable. skip: the run finishes
    and counts every draw of it (8 records, one epoch of one batch of 8: once a round).
    fail: the round is checkpointed, exit 2 names the record; after the image is fixed,
    the same command resumes there and ends as a run that never met the bad image."""
    import shutil

    from helpers import llava_json_args, load_metrics
    from pilot_hpc.data.synthetic import client_files

    train, _ = client_files(small_world[1], 3)
    with open(train[1]) as fh:
        records = json.load(fh)[:8]
    image = tmp_path / "record3.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    good_image = os.path.join(small_world[1], records[3]["image"])
    records[3]["image"] = str(image)  # an absolute path: the shared image folder stays untouched
    shard = tmp_path / "client_01_train.json"
    shard.write_text(json.dumps(records))
    files = [train[0], str(shard), train[2]]

    def args(out, policy):
        return llava_json_args(small_world, tmp_path / out, files) + ["data.verify_images=false",
                                                                      f"data.on_bad_sample={policy}"]

    skip = run_main(args("skip", "skip"), timeout=300)
    assert skip.returncode == 0, skip.stderr[-3000:]
    said = skip.stdout + skip.stderr  # the warnings go where the run's log goes
    assert "skipped an unreadable sample (data.on_bad_sample=skip): " + str(shard) + \
        ": record 3 (id 'client_01_train-000003'): image" in said
    assert "round 1: unreadable samples skipped (data.on_bad_sample=skip): client 1: 1" in said
    counts = [[c["bad_samples"] for c in r["clients"]] for r in load_metrics(tmp_path / "skip")["rounds"]]
    assert counts == [[0, 0, 0], [0, 1, 0], [0, 1, 0]]

    fail = run_main(args("fail", "fail"), np=3, timeout=300)
    assert fail.returncode == 2, fail.stdout[-2000:] + fail.stderr[-2000:]
    assert ("unreadable sample (data.on_bad_sample=fail): " + str(shard) +
            ": record 3 (id 'client_01_train-000003'): image") in fail.stderr
    assert "Traceback" not in fail.stderr
    assert (tmp_path / "fail" / "checkpoints" / "round_001.preempt.h5").exists()
    shutil.copyfile(good_image, image)  # the fix
    resumed = run_main(args("fail", "fail"), np=3, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "interrupted mid-round" in resumed.stdout
    clean = run_main(args("clean", "fail"), timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    a, b = load_metrics(tmp_path / "fail"), load_metrics(tmp_path / "clean")
    assert a["final"] == b["final"] and a["rounds"] == b["rounds"]
