"""Centralized: one model (projector + LoRA) trained on the union of every client's
training data, evaluated on each client's own split; the paper's upper reference.
Runs in one process (W = 1): the data of all clients meets in one place by design."""

from __future__ import annotations

from pilot_hpc.fl.strategies.base import register
from pilot_hpc.fl.strategies.fedavg import FedAvg


@register("centralized")
class Centralized(FedAvg):
    communicates = False
    pooled = True
