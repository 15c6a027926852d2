"""HDF5 round checkpoints: layout, lossless bf16, checksums, atomic rename, h5dump-readable."""

import shutil
import subprocess

import h5py
import pytest
import torch

from helpers import SMOKE
from pilot_hpc import checkpoint
from pilot_hpc.config import load_config


def write(tmp_path, states):
    cfg = load_config(SMOKE)
    final = tmp_path / "round_001.h5"
    tmp = str(final) + ".tmp"
    checkpoint.create(tmp, cfg, 1)
    checkpoint.append_clients(tmp, {0: ("vqa", 12, states[0])})
    checkpoint.append_clients(tmp, {1: ("caption", 7, states[1])})
    assert not final.exists()  # nothing under the final name until finalize
    checkpoint.finalize(tmp, str(final))
    return cfg, final


def test_round_trip_is_exact_including_bf16(tmp_path):
    torch.manual_seed(0)
    states = [{"connector.router.weight": torch.randn(3, 5), "lora.a": torch.randn(4, 2).to(torch.bfloat16),
               "scalar": torch.tensor(2.5)},
              {"connector.router.weight": torch.randn(3, 5), "lora.a": torch.randn(4, 2).to(torch.bfloat16),
               "scalar": torch.tensor(1.0)}]
    cfg, final = write(tmp_path, states)
    attrs, clients = checkpoint.load(str(final))
    assert attrs["round"] == 1 and attrs["config_hash"] == cfg.hash()
    assert "torch" in attrs["versions"] and attrs["git_commit"]
    assert clients[0]["task"] == "vqa" and clients[1]["num_samples"] == 7
    for k in (0, 1):
        for name, t in states[k].items():
            got = clients[k]["state"][name]
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(torch.int16) if t.dtype == torch.bfloat16 else got,
                               t.view(torch.int16) if t.dtype == torch.bfloat16 else t)
    with h5py.File(final, "r") as f:
        ds = f["clients/client_00/lora.a"]
        assert ds.fletcher32 and ds.attrs["dtype"] == "bfloat16"


def test_corrupt_dataset_is_reported_with_its_key(tmp_path):
    states = [{"w": torch.arange(4096, dtype=torch.float32)}, {"w": torch.zeros(3)}]
    _, final = write(tmp_path, states)
    with h5py.File(final, "r") as f:
        offset = f["clients/client_00/w"].id.get_chunk_info(0).byte_offset  # chunked (fletcher32)
    raw = bytearray(final.read_bytes())
    raw[offset + 100] ^= 0xFF  # flip bits inside the data: fletcher32 must catch it
    final.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"/clients/client_00/w is corrupt"):
        checkpoint.load(str(final))


def test_not_hdf5_is_a_clear_error(tmp_path):
    bad = tmp_path / "round_001.h5"
    bad.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        checkpoint.load(str(bad))


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (Debian hdf5-tools) not installed; make installs it")
def test_h5dump_reads_the_file(tmp_path):
    _, final = write(tmp_path, [{"w": torch.ones(2, 2)}, {"w": torch.zeros(2)}])
    out = subprocess.run(["h5dump", "-H", str(final)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "client_00" in out.stdout and "config_hash" in out.stdout
