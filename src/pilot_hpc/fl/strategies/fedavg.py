"""FedAvg (McMahan et al. 2017): one global model, the sample-weighted average of all
trainable parameters (the projector and the LoRA), sent back to every client."""

from __future__ import annotations

import torch

from pilot_hpc.fl import aggregate
from pilot_hpc.fl.flat import unflatten_into
from pilot_hpc.fl.strategies.base import Aggregator, ClientPolicy, MixPlan, register
from pilot_hpc.model.connector import PLAIN


class FedAvgClient(ClientPolicy):
    """Trains the projector (the connector's task adapter) and the LoRA at stage PLAIN,
    sends both, installs the global model."""

    def stage(self, round_: int) -> int:
        return PLAIN

    def shared_params(self, pm) -> list[torch.Tensor]:
        return list(pm.connector.task_adapter.parameters())

    def personal_params(self, pm) -> list[torch.Tensor]:
        return [p for _, p in pm.lora_named_parameters()]

    def install(self, pm, shared, personal) -> None:
        if torch.isfinite(shared[0]).all():
            unflatten_into(shared[0], self.shared_params(pm))
        if personal is not None and torch.isfinite(personal).all():
            unflatten_into(personal, self.personal_params(pm))


class FedAvgServer(Aggregator):
    global_personal = True  # plan(): every personal row is the weighted mean

    def shared_rows(self) -> int:
        return 1

    def weights(self, n: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
        """[K]: each good client's weight in the mean (n_k / sum_j n_j over the good ones)."""
        return aggregate.average_coefficients(n, good)

    def plan(self, n, good, gram) -> MixPlan:
        """One global model: every row is the weighted mean of the good updates (all NaN
        when no client sent a usable update: everyone keeps what it has)."""
        k = len(n)
        if not good.any():
            nan = torch.full((k, k), float("nan"), dtype=torch.float64)
            return MixPlan(shared=nan[:1].clone(), personal=nan, excluded=list(range(k)))
        w = self.weights(n, good)
        return MixPlan(shared=w[None, :].clone(), personal=w[None, :].expand(k, -1).clone(),
                       excluded=(~good).nonzero().flatten().tolist())


register("fedavg", FedAvgClient, FedAvgServer)
