"""Shepherd (Zhang et al. 2024, FedIT): FedAvg of the LoRA only; the projector is trained
locally and never leaves the client."""

from __future__ import annotations

import torch

from pilot_hpc.fl.strategies.base import register
from pilot_hpc.fl.strategies.fedavg import FedAvg


@register("shepherd")
class Shepherd(FedAvg):
    def visual_params(self, pm) -> list[torch.Tensor]:
        return []

