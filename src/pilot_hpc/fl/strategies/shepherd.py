"""Shepherd (Zhang et al. 2024, FedIT): FedAvg of the LoRA only; the projector is trained
locally and never leaves the client."""

from __future__ import annotations

import torch

from pilot_hpc.fl.strategies.base import register
from pilot_hpc.fl.strategies.fedavg import FedAvgClient, FedAvgServer


class ShepherdClient(FedAvgClient):
    def shared_params(self, pm) -> list[torch.Tensor]:
        return []


register("shepherd", ShepherdClient, FedAvgServer)
