"""Local training: every client trains its own projector and LoRA; nothing is exchanged."""

from __future__ import annotations

from pilot_hpc.fl.strategies.base import register
from pilot_hpc.fl.strategies.fedavg import FedAvg


@register("local")
class Local(FedAvg):
    communicates = False
