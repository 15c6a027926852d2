"""HDF5 checkpoints (the only h5py importer).

Layout of <output_dir>/checkpoints/round_NNN.h5 (see README "Checkpoint layout"):
  /                       attrs: format, round, config (YAML), config_hash, versions (JSON), git_commit
  /clients/client_KK/     attrs: task, num_samples
      <state key>         one dataset per tensor, e.g. connector.task_adapter.linear_1.weight,
                          lora.base_model.model...lora_A.default.weight
Every dataset carries a fletcher32 checksum; bf16 tensors are stored as their uint16
words with attr dtype="bfloat16" (lossless; HDF5 has no bf16 type). The file is
written as <name>.tmp, flushed, fsynced and renamed, so a crash never leaves a half
file under the final name. libver ("earliest", "v110") keeps it readable by HDF5 1.10.
"""

from __future__ import annotations

import json
import os
import subprocess

import h5py
import numpy as np
import torch
import yaml

FORMAT = "pilot_hpc-checkpoint-1"
LIBVER = ("earliest", "v110")


def _versions() -> dict[str, str]:
    import transformers
    import peft

    import pilot_hpc

    return {"pilot_hpc": pilot_hpc.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version}


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _write_tensor(group: h5py.Group, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        data, dtype = t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    else:
        data, dtype = t.numpy(), str(t.dtype).replace("torch.", "")
    # fletcher32 needs chunking; a scalar cannot be chunked, so store it as shape (1,).
    shape = data.shape
    if data.ndim == 0:
        data = data.reshape(1)
    ds = group.create_dataset(name, data=data, fletcher32=True, chunks=True if data.size else None)
    ds.attrs["dtype"] = dtype
    ds.attrs["shape"] = np.array(shape, dtype=np.int64)


def _read_tensor(ds: h5py.Dataset) -> torch.Tensor:
    data = ds[()]
    shape = tuple(int(s) for s in ds.attrs["shape"])
    if ds.attrs["dtype"] == "bfloat16":
        return torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.array(data)).reshape(shape)


def create(tmp_path: str, cfg, round_: int) -> None:
    """Starts a checkpoint file with the run's identity (rank 0)."""
    with h5py.File(tmp_path, "w", libver=LIBVER) as f:
        f.attrs["format"] = FORMAT
        f.attrs["round"] = round_
        f.attrs["config"] = yaml.safe_dump(cfg.to_dict(), sort_keys=True)
        f.attrs["config_hash"] = cfg.hash()
        f.attrs["versions"] = json.dumps(_versions(), sort_keys=True)
        f.attrs["git_commit"] = _git_commit()
        f.create_group("clients")


def append_clients(tmp_path: str, clients: dict[int, tuple[str, int, dict[str, torch.Tensor]]]) -> None:
    """Adds each client's personal state (one rank at a time: HDF5 files have one writer)."""
    with h5py.File(tmp_path, "a", libver=LIBVER) as f:
        for k, (task, n, state) in sorted(clients.items()):
            g = f["clients"].create_group(f"client_{k:02d}")
            g.attrs["task"] = task
            g.attrs["num_samples"] = n
            for name, tensor in state.items():
                _write_tensor(g, name, tensor)


def finalize(tmp_path: str, final_path: str) -> None:
    """fsync the finished file, then rename it into place (atomic on POSIX)."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp_path, final_path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(final_path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str) -> tuple[dict, dict[int, dict]]:
    """(attrs, {client: {"task", "num_samples", "state"}}); errors name the file and key."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"checkpoint {path}: not a readable HDF5 file ({err})") from None
    with f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"checkpoint {path}: attribute 'format' is {f.attrs.get('format')!r}, expected {FORMAT!r}")
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        clients = {}
        for name, g in f["clients"].items():
            state = {}
            for key, ds in g.items():
                try:
                    state[key] = _read_tensor(ds)
                except OSError as err:  # fletcher32 mismatch surfaces as an OSError from HDF5
                    raise ValueError(f"checkpoint {path}: dataset /clients/{name}/{key} is corrupt ({err})") from None
            clients[int(name.split("_")[1])] = {"task": g.attrs["task"], "num_samples": int(g.attrs["num_samples"]),
                                                "state": state}
    return attrs, clients
