"""fl.client_state=disk: the personal state of the clients a rank hosts lives in files, not
in the rank's memory, so that memory does not grow with the clients it hosts.

Each client's state (and, during its round, its round-start state) is one safetensors
file in <run.output_dir>/client_state/rank_RRR/, written atomically (a temporary file,
then os.replace: a crash leaves the previous file or the new one, never half of one). A
client holds in memory only while it is hosted. The files are a working area, not a
checkpoint: the whole-run checkpoint still holds every client's state (written from
these files one client at a time), and a resumed run restores them from it. safetensors
stores the tensors' bytes as they are, so a state read back is bitwise the one written.

A client that has not changed since the start has no file: it reads the shared initial
state, which every client starts from (as fl.client_state=memory shares it). Its
datasets' decoded-image cache (data.cache_images) is emptied after every hosting, so
that it too lives only while the client is hosted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pilot_hpc.checkpoint.store import ClientCheckpoint
from pilot_hpc.fl.client import ClientSlot


class StateFiles:
    """One rank's folder of client state files."""

    def __init__(self, output_dir: str, rank: int, initial: dict[str, torch.Tensor]):
        self.folder = os.path.join(output_dir, "client_state", f"rank_{rank:03d}")
        # Files of an earlier run in this folder are not this run's states: a fresh start
        # begins from the initial state, a resume restores every client from its checkpoint.
        shutil.rmtree(self.folder, ignore_errors=True)
        os.makedirs(self.folder, exist_ok=True)
        self.initial = initial

    def path(self, k: int, kind: str) -> str:
        return os.path.join(self.folder, f"client_{k:03d}.{kind}.safetensors")

    def put(self, k: int, kind: str, state: dict[str, torch.Tensor] | None) -> None:
        path = self.path(k, kind)
        if state is None:
            if os.path.exists(path):
                os.remove(path)
            return
        tmp = path + ".tmp"
        # The key order travels in the metadata: a state read back iterates as written
        # (safetensors orders its header by itself).
        save_file({key: t.detach().contiguous().cpu() for key, t in state.items()}, tmp,
                  metadata={"order": json.dumps(list(state))})
        os.replace(tmp, path)

    def get(self, k: int, kind: str) -> dict[str, torch.Tensor] | None:
        path = self.path(k, kind)
        if not os.path.exists(path):
            return dict(self.initial) if kind == "state" else None
        with safe_open(path, framework="pt") as f:
            order = json.loads(f.metadata()["order"])
            return {key: f.get_tensor(key) for key in order}


def _stored(kind: str) -> property:
    """A slot field (dict of tensors or None) kept in the rank's StateFiles under `kind`,
    read and written on every access."""
    return property(lambda self: self.files.get(self.k, kind),
                    lambda self, value: self.files.put(self.k, kind, value))


class DiskClientSlot(ClientSlot):
    """A ClientSlot whose `state`, `pre_state` and `residual` (a lossy fl.codec) are read from and written to its rank's
    StateFiles on every access: the same transitions, no resident copy."""

    def __init__(self, *args, files: StateFiles, **kwargs):
        self.files = files
        super().__init__(*args, **kwargs)
        self.release()  # the load-time check decoded every image

    def release(self) -> None:
        """Its datasets' decoded images (data.cache_images) are kept only while it is hosted:
        they were most of what a client cost its rank (BENCHMARKS.md, "Many clients"). The
        images decode again to the same values when it is next hosted."""
        for data in (self.train, self.eval):
            drop = getattr(data, "drop_cached_images", None)
            if drop is not None:
                drop()

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self.files.get(self.k, "state")

    @state.setter
    def state(self, value: dict[str, torch.Tensor]) -> None:
        initial = self.files.initial
        if value.keys() == initial.keys() and all(value[key] is initial[key] for key in value):
            self.files.put(self.k, "state", None)  # the initial state needs no file (module docstring)
        else:
            self.files.put(self.k, "state", value)

    pre_state = _stored("pre")
    residual = _stored("residual")

    def record(self, complete: bool) -> ClientCheckpoint:
        """As ClientSlot.record, its tensors read from the files one at a time as the
        checkpoint writes them (a rank never holds all its clients' states at once)."""
        rec = super().record(complete)
        return dataclasses.replace(rec, state=FileState(self.files, self.k, "state"),
                                   pre_state=None if rec.pre_state is None else FileState(self.files, self.k, "pre"))


class FileState(Mapping):
    """A client's state file as a read-only mapping that loads each tensor when asked."""

    def __init__(self, files: StateFiles, k: int, kind: str):
        self.path = files.path(k, kind)
        self.fallback = files.initial if not os.path.exists(self.path) else None
        if self.fallback is None:
            with safe_open(self.path, framework="pt") as f:
                self.order = json.loads(f.metadata()["order"])
        else:
            self.order = list(self.fallback)

    def __getitem__(self, key: str) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback[key]
        if key not in self.order:
            raise KeyError(key)
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)
