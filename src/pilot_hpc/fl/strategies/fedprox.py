"""FedProx (Li et al. 2020): FedAvg plus the proximal term (mu / 2) * ||w - w_global||^2
over the trainable parameters in every local step (fedprox.mu)."""

from __future__ import annotations

import torch

from pilot_hpc.fl import lora_distance
from pilot_hpc.fl.client import hosted_client
from pilot_hpc.fl.strategies.base import register
from pilot_hpc.fl.strategies.fedavg import FedAvgClient, FedAvgServer


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    return (mu / 2.0) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


class FedProxClient(FedAvgClient):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.anchor: list[torch.Tensor] = []

    def begin_round(self, pm, round_: int, start_state) -> None:
        super().begin_round(pm, round_, start_state)
        # w_global of this round: what the client held at the round's start (also right
        # when an interrupted round resumes mid-way).
        names = [f"connector.task_adapter.{n}" for n, _ in pm.connector.task_adapter.named_parameters()]
        names += [f"lora.{n}" for n, _ in pm.lora_named_parameters()]
        self.anchor = [start_state[n].detach().clone() for n in names]
        if self.ranks is not None:
            # stack with smaller ranks: the anchor truncated as the live LoRA is, or the
            # proximal pull mu (w - anchor) would revive the components beyond the rank.
            lora_distance.truncate_(list(zip(names, self.anchor)), self.ranks[hosted_client()])

    def extra_loss(self, pm) -> dict[str, torch.Tensor]:
        return {"prox": proximal_term(self.shared_params(pm) + self.personal_params(pm), self.anchor,
                                      self.cfg.fedprox.mu)}


register("fedprox", FedProxClient, FedAvgServer)
