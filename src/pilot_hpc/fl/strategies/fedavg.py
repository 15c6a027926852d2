"""FedAvg (McMahan et al. 2017): one global model, the sample-weighted average of all
trainable parameters (the projector and the LoRA), sent back to every client."""

from __future__ import annotations

import torch

from pilot_hpc.fl import aggregate
from pilot_hpc.fl.flat import unflatten_into
from pilot_hpc.fl.strategies.base import ServerResult, Strategy, register
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

    def global_update(self, visual, text, n, good) -> tuple[torch.Tensor, torch.Tensor]:
        """The new global (visual [Pv], text [Pt]) from this round's good updates."""
        keep = good.nonzero().flatten()
        return (aggregate.weighted_average(visual[keep], n[keep]),
                aggregate.weighted_average(text[keep], n[keep]))

    def aggregate(self, visual, text, n, tasks, num_tasks) -> ServerResult:
        good = aggregate.finite_rows(visual) & aggregate.finite_rows(text)
        if not good.any():  # nobody sent a usable update: everyone keeps what it has
            nan = float("nan")
            return ServerResult(shared=torch.full_like(visual[:1], nan), personal=torch.full_like(text, nan),
                                excluded=list(range(visual.shape[0])))
        g_visual, g_text = self.global_update(visual, text, n, good)
        return ServerResult(shared=g_visual[None, :], personal=g_text[None, :].expand_as(text).clone(),
                            excluded=(~good).nonzero().flatten().tolist())

    def install(self, pm, shared, personal, round_) -> None:
        if torch.isfinite(shared[0]).all():
            unflatten_into(shared[0], self.visual_params(pm))
        if torch.isfinite(personal).all():
            unflatten_into(personal, self.text_params(pm))
