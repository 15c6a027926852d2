"""Pilot: task-aware aggregation of the task adapters, ATA top-M for the LoRA."""

from __future__ import annotations

import torch

from pilot_hpc.fl import aggregate
from pilot_hpc.fl.flat import unflatten_into
from pilot_hpc.fl.strategies.base import ServerResult, Strategy, register


def _top_m(cfg, text, n, tasks, num_tasks, good):
    """ATA: each client mixes its M nearest clients' LoRA (the default)."""
    return aggregate.ata_aggregate(text, n, cfg.fl.top_m, cfg.fl.ata_eps, good)


def _same_task(cfg, text, n, tasks, num_tasks, good):
    """The sample-weighted average of the LoRA of the client's own task's clients."""
    return aggregate.task_aware_average(text, n, tasks, num_tasks, good)[tasks.to(text.device)]


def _all(cfg, text, n, tasks, num_tasks, good):
    """FedAvg of the LoRA over every client (ATA off)."""
    keep = good.nonzero().flatten()
    return aggregate.weighted_average(text[keep], n[keep])[None, :].expand_as(text).clone()


SELECTIONS = {"topm": _top_m, "same_task": _same_task, "all": _all}


@register("pilot")
class Pilot(Strategy):
    def stage(self, round_: int) -> int:
        return 1 if round_ == 1 else 2

    def visual_params(self, pm) -> list[torch.Tensor]:
        # Stage 1 sends psi_t; stage 2 sends the own expert psi_1, the same module.
        return list(pm.connector.task_adapter.parameters())

    def text_params(self, pm) -> list[torch.Tensor]:
        return [p for _, p in pm.lora_named_parameters()]

    def shared_rows(self, num_tasks: int) -> int:
        return num_tasks

    def begin_round(self, pm, round_: int, start_state) -> None:
        # Stage-2 entry: cross-task adapters from the (aggregated) own task adapter.
        if self.stage(round_) == 2 and not pm.connector.cross_ready:
            pm.connector.init_cross_adapters()

    def aggregate(self, visual, text, n, tasks, num_tasks) -> ServerResult:
        good = aggregate.finite_rows(visual) & aggregate.finite_rows(text)
        shared = aggregate.task_aware_average(visual, n, tasks, num_tasks, good)  # [T, Pv]
        personal = self.select_text(text, n, tasks, num_tasks, good)  # [K, Pl]
        return ServerResult(shared=shared, personal=personal, excluded=(~good).nonzero().flatten().tolist())

    def select_text(self, text, n, tasks, num_tasks, good) -> torch.Tensor:
        """Each client's LoRA by pilot.selection (Table 5)."""
        if not good.any():
            return torch.full_like(text, float("nan"))
        rows = SELECTIONS[self.cfg.pilot.selection](self.cfg, text, n, tasks, num_tasks, good)
        rows[~good.to(text.device)] = float("nan")  # an excluded client installs nothing
        return rows

    def install(self, pm, shared, personal, round_) -> None:
        conn = pm.connector
        # Task t's adapter goes to the own expert (t = own task) or to foreign expert t.
        targets = {conn.own_task: conn.task_adapter}
        targets.update(zip(conn.foreign_tasks(), conn.foreign))
        for t in range(shared.shape[0]):
            if torch.isfinite(shared[t]).all():  # NaN row: no good client of task t this round
                unflatten_into(shared[t], list(targets[t].parameters()))
        unflatten_into(personal, self.text_params(pm))
