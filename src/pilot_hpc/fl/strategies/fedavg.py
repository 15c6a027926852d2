"""FedAvg (McMahan et al. 2017): one global model, the sample-weighted average of all
trainable parameters (the projector and the LoRA), sent back to every client."""

from __future__ import annotations

import torch

from pilot_hpc.fl import aggregate
from pilot_hpc.fl.flat import unflatten_into
from pilot_hpc.fl.strategies.base import MixPlan, Strategy, register
from pilot_hpc.model.connector import PLAIN


@register("fedavg")
class FedAvg(Strategy):
    def stage(self, round_: int) -> int:
        return PLAIN

    def visual_params(self, pm) -> list[torch.Tensor]:
        return list(pm.connector.task_adapter.parameters())

    def text_params(self, pm) -> list[torch.Tensor]:
        return [p for _, p in pm.lora_named_parameters()]

    def shared_rows(self, num_tasks: int) -> int:
        return 1

    def plan(self, n, tasks, num_tasks, good, gram) -> MixPlan:
        """One global model: every row is the sample-weighted mean of the good updates
        (all NaN when no client sent a usable update: everyone keeps what it has)."""
        k = len(n)
        if not good.any():
            nan = torch.full((k, k), float("nan"), dtype=torch.float64)
            return MixPlan(shared=nan[:1].clone(), personal=nan, excluded=list(range(k)))
        w = aggregate.average_coefficients(n, good)
        return MixPlan(shared=w[None, :].clone(), personal=w[None, :].expand(k, -1).clone(),
                       excluded=(~good).nonzero().flatten().tolist())

    def install(self, pm, shared, personal, round_) -> None:
        if torch.isfinite(shared[0]).all():
            unflatten_into(shared[0], self.visual_params(pm))
        if torch.isfinite(personal).all():
            unflatten_into(personal, self.text_params(pm))
