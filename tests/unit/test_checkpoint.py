"""HDF5 checkpoints: layout, lossless bf16, checksums, atomic rename, checks, h5dump."""

import os
import shutil
import subprocess

import h5py
import pytest
import torch

from helpers import SMOKE
from pilot_hpc import checkpoint
from pilot_hpc.checkpoint import CheckpointError, ClientCheckpoint, Status
from pilot_hpc.config import load_config
from pilot_hpc.train.spec import TrainProgress


def client(task, n, state, **kw):
    return ClientCheckpoint(task=task, num_samples=n, state=state, **kw)


def write(folder, states, round_=1, complete=True, server=None, partial_progress=None):
    cfg = load_config(SMOKE)
    final = os.path.join(folder, checkpoint.file_name(round_, complete))
    tmp = final + ".tmp"
    checkpoint.create(tmp, cfg, round_, complete=complete, history=[{"round": 0, "clients": []}],
                      server=server or {})
    checkpoint.append_clients(tmp, {0: client("vqa", 12, states[0], losses={"ce": 0.5}, steps=3)})
    extra = {}
    if partial_progress is not None:
        extra = dict(status=Status.PARTIAL, pre_state=states[1], progress=partial_progress)
    checkpoint.append_clients(tmp, {1: client("caption", 7, states[1], **extra)})
    assert not os.path.exists(final)  # nothing under the final name until finalize
    checkpoint.finalize(tmp, final)
    return cfg, final


def states_pair():
    torch.manual_seed(0)
    return [{"connector.router.weight": torch.randn(3, 5), "lora.a": torch.randn(4, 2).to(torch.bfloat16),
             "scalar": torch.tensor(2.5)} for _ in range(2)]


def test_round_trip_is_exact_including_bf16_and_progress(tmp_path):
    states = states_pair()
    progress = TrainProgress(step=4, samples=32, sums={"ce": 1.25}, torch_rng=torch.get_rng_state(),
                             optimizer={"0.exp_avg": torch.randn(3, 5), "0.step": torch.tensor(4.0)})
    cfg, final = write(str(tmp_path), states, complete=False, server={"m": torch.ones(3)}, partial_progress=progress)
    ck = checkpoint.read(final)
    assert ck.round == 1 and not ck.complete and ck.attrs["config_hash"] == cfg.hash()
    assert ck.attrs["result_hash"] == cfg.result_hash() and "torch" in ck.attrs["versions"]
    assert ck.history == [{"round": 0, "clients": []}]
    torch.testing.assert_close(ck.server["m"], torch.ones(3))
    assert ck.clients[0].task == "vqa" and ck.clients[0].losses == {"ce": 0.5} and ck.clients[0].steps == 3
    for k in (0, 1):
        for name, t in states[k].items():
            got = ck.clients[k].state[name]
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(torch.int16) if t.dtype == torch.bfloat16 else got,
                               t.view(torch.int16) if t.dtype == torch.bfloat16 else t)
    c1 = ck.clients[1]
    assert c1.status is Status.PARTIAL and c1.progress.step == 4 and c1.progress.sums == {"ce": 1.25}
    with h5py.File(final, "r") as f:  # the file keeps the plain strings (older files load alike)
        assert [f[f"clients/client_0{k}"].attrs["status"] for k in (0, 1)] == ["pending", "partial"]
    assert torch.equal(c1.progress.torch_rng, progress.torch_rng)
    assert torch.equal(c1.progress.optimizer["0.exp_avg"], progress.optimizer["0.exp_avg"])
    with h5py.File(final, "r") as f:
        ds = f["clients/client_00/state/lora.a"]
        assert ds.fletcher32 and ds.attrs["dtype"] == "bfloat16"


def test_stored_config_reloads_with_the_same_task_ids(tmp_path):
    """Task ids are positions in fl.task_metrics (vqa, caption, grounding by default, not
    alphabetical): the checkpoint's config reloads with the same order, so export builds
    each client with the own-task id it trained with."""
    from pilot_hpc.export import run_config

    cfg, final = write(str(tmp_path), states_pair())
    assert cfg.tasks != sorted(cfg.tasks)  # the check below could not fail otherwise
    again = run_config(checkpoint.read(final, clients=[]).attrs, final)
    assert again.tasks == cfg.tasks and again.hash() == cfg.hash()


def test_candidates_newest_first(tmp_path):
    for name in ("round_001.h5", "round_002.preempt.h5", "round_002.h5", "round_003.preempt.h5", "x.h5",
                 "round_004.h5.tmp"):
        (tmp_path / name).write_bytes(b"")
    names = [os.path.basename(p) for p, _, _ in checkpoint.candidates(str(tmp_path))]
    assert names == ["round_003.preempt.h5", "round_002.h5", "round_002.preempt.h5", "round_001.h5"]


def test_byte_flip_is_reported_with_its_key(tmp_path):
    _, final = write(str(tmp_path), [{"w": torch.arange(4096, dtype=torch.float32)}, {"w": torch.zeros(3)}])
    with h5py.File(final, "r") as f:
        offset = f["clients/client_00/state/w"].id.get_chunk_info(0).byte_offset  # chunked (fletcher32)
    raw = bytearray(open(final, "rb").read())
    raw[offset + 100] ^= 0xFF  # flip bits inside the data: fletcher32 must catch it
    open(final, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match=r"/clients/client_00/state/w is corrupt"):
        checkpoint.read(final)


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    _, final = write(str(tmp_path), [{"w": torch.ones(5000)}, {"w": torch.zeros(3)}])
    size = os.path.getsize(final)
    with open(final, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CheckpointError, match="round_001.h5"):
        checkpoint.read(final)
    other = tmp_path / "round_002.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(CheckpointError, match="format 'something-else'"):
        checkpoint.read(str(other))


def test_validate_names_missing_keys_and_wrong_shapes(tmp_path):
    _, final = write(str(tmp_path), [{"w": torch.ones(2, 3)}, {"w": torch.ones(2, 3)}])
    ck = checkpoint.read(final)
    checkpoint.validate(ck, 2, {"w": (2, 3)})
    with pytest.raises(CheckpointError, match=r"client_00/state/w has shape \(2, 3\), the model has \(3, 2\)"):
        checkpoint.validate(ck, 2, {"w": (3, 2)})
    with pytest.raises(CheckpointError, match=r"missing keys \['v'\]"):
        checkpoint.validate(ck, 2, {"w": (2, 3), "v": (1,)})
    with pytest.raises(CheckpointError, match=r"clients \[0, 1\], expected 0..2"):
        checkpoint.validate(ck, 3, {"w": (2, 3)})


def test_missing_attribute_is_named(tmp_path):
    _, final = write(str(tmp_path), [{"w": torch.ones(2)}, {"w": torch.ones(2)}])
    with h5py.File(final, "a") as f:
        del f["clients/client_01"].attrs["status"]
    # The whole-file read (rank 0, choosing) sees a changed file; a rank reading only its
    # clients (no digest: rank 0 verified the file) still names what is missing.
    with pytest.raises(CheckpointError, match=r"content digest mismatch"):
        checkpoint.read(final)
    with pytest.raises(CheckpointError, match=r"/clients/client_01: missing attribute 'status'"):
        checkpoint.read(final, clients=[1])


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (Debian hdf5-tools) not installed; make installs it")
def test_h5dump_reads_the_documented_layout_and_filter(tmp_path):
    _, final = write(str(tmp_path), [{"connector.router.weight": torch.ones(2, 2)}, {"connector.router.weight": torch.zeros(2, 2)}])
    out = subprocess.run(["h5dump", "-p", "-H", final], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for needle in ('GROUP "clients"', 'GROUP "client_00"', 'GROUP "state"', 'DATASET "connector.router.weight"',
                   "CHECKSUM FLETCHER32", 'ATTRIBUTE "config_hash"', 'GROUP "server"'):
        assert needle in out.stdout, needle
