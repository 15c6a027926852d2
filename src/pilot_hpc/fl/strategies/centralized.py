"""Centralized: one model (projector + LoRA) trained on the union of every client's
training data, evaluated on each client's own split; the paper's upper reference.
Runs in one process (W = 1): the data of all clients meets in one place by design."""

from __future__ import annotations

import numpy as np
import torch

from pilot_hpc.fl.strategies.base import register
from pilot_hpc.fl.strategies.fedavg import FedAvgClient


class PooledDataset(torch.utils.data.Dataset):
    """The union of several clients' training sets."""

    def __init__(self, parts: list):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[part][i - int(self.offsets[part])]


class CentralizedClient(FedAvgClient):
    pooled = True

    def local_jobs(self, slots: list) -> list[tuple]:
        """One model, kept in the first client's slot, on everyone's data."""
        return [(slots[0], PooledDataset([s.train for s in slots]))]

    def after_local(self, slots: list) -> None:
        """Then every client holds that model."""
        for slot in slots[1:]:
            slot.adopt(slots[0])


register("centralized", CentralizedClient, None)
