"""Export and load_client: bad input gets one clear error (exit 2), and the package stays
cheap to import. (Exporting real runs: tests/e2e/test_results_outputs.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, SMOKE

from pilot_hpc import checkpoint
from pilot_hpc.config import load_config
from pilot_hpc.export import ExportError, find_checkpoint, load_client, main


def _fake_run(tmp_path, rounds=(1,), clients=3) -> str:
    """A run folder whose checkpoints hold a config and tiny client records (no model)."""
    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path}", "fl.num_clients=3",
                              "fl.client_tasks=[vqa, caption, grounding]", "pilot.top_m=1"])
    folder = tmp_path / "checkpoints"
    folder.mkdir(exist_ok=True)
    for r in rounds:
        tmp = str(folder / (checkpoint.file_name(r, True) + ".tmp"))
        checkpoint.create(tmp, cfg, r, complete=True, history=[], server={})
        checkpoint.append_clients(tmp, {k: checkpoint.ClientCheckpoint(task=cfg.fl.client_tasks[k], num_samples=1,
                                                                         state={"lora.x": torch.zeros(2)})
                                        for k in range(clients)})
        checkpoint.finalize(tmp, str(folder / checkpoint.file_name(r, True)))
    return str(tmp_path)


def _run(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_a_run_without_checkpoints(tmp_path, capsys):
    code, err = _run(capsys, "--run", str(tmp_path), "--client", "0", "--out", str(tmp_path / "x"))
    assert code == 2
    assert "no complete checkpoint" in err and str(tmp_path / "checkpoints") in err
    assert err.count("\n") == 1  # one line, no traceback


def test_a_round_that_does_not_exist(tmp_path, capsys):
    run = _fake_run(tmp_path, rounds=(1, 2))
    code, err = _run(capsys, "--run", run, "--round", "5", "--client", "0", "--out", str(tmp_path / "x"))
    assert code == 2 and "no checkpoint of round 5" in err and "complete rounds: [1, 2]" in err
    assert find_checkpoint(run, None).endswith("round_002.h5")  # the newest by default


def test_a_client_that_does_not_exist(tmp_path, capsys):
    run = _fake_run(tmp_path)
    code, err = _run(capsys, "--run", run, "--client", "7", "--out", str(tmp_path / "x"))
    assert code == 2 and "no client 7" in err and "clients 0..2" in err and "round_001.h5" in err


def test_a_checkpoint_missing_the_client_record(tmp_path, capsys):
    run = _fake_run(tmp_path, clients=2)  # the config says 3 clients, the file holds 2
    code, err = _run(capsys, "--run", run, "--client", "2", "--out", str(tmp_path / "x"))
    assert code == 2 and "client_02" in err


def test_a_corrupt_checkpoint(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "round_001.h5").write_bytes(b"not hdf5 at all")
    code, err = _run(capsys, "--run", str(tmp_path), "--client", "0", "--out", str(tmp_path / "x"))
    assert code == 2 and "round_001.h5" in err and "not a readable HDF5 file" in err


def test_load_client_refuses_a_folder_export_did_not_write(tmp_path):
    with pytest.raises(ExportError, match="no connector.json"):
        load_client(str(tmp_path))


def test_importing_pilot_hpc_stays_cheap():
    code = ("import sys, pilot_hpc; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(pilot_hpc.load_client); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
