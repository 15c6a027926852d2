"""Pilot: task-aware aggregation of the task adapters, ATA top-M for the LoRA."""

from __future__ import annotations

import torch

from pilot_hpc.fl import aggregate
from pilot_hpc.fl.flat import unflatten_into
from pilot_hpc.fl.strategies.base import MixPlan, Strategy, register


def _top_m(cfg, n, tasks, num_tasks, good, gram):
    """ATA: each client mixes its M nearest clients' LoRA (the default)."""
    return aggregate.ata_mixing(gram, n, cfg.pilot.top_m, cfg.pilot.ata_eps, good)


def _same_task(cfg, n, tasks, num_tasks, good, gram):
    """The sample-weighted average of the LoRA of the client's own task's clients."""
    return aggregate.task_aware_coefficients(n, tasks, num_tasks, good)[tasks.cpu()]


def _all(cfg, n, tasks, num_tasks, good, gram):
    """FedAvg of the LoRA over every client (ATA off)."""
    return aggregate.average_coefficients(n, good)[None, :].expand(len(n), -1).clone()


# Each maps to the [K, K] mixing matrix of the clients' LoRA (Table 5).
SELECTIONS = {"topm": _top_m, "same_task": _same_task, "all": _all}


def _task_module(conn, t: int):
    """The module of a connector that holds task t's adapter."""
    if t == conn.own_task:
        return conn.task_adapter
    return conn.foreign[conn.foreign_tasks().index(t)]


@register("pilot")
class Pilot(Strategy):
    def stage(self, round_: int) -> int:
        return 1 if round_ == 1 else 2

    def visual_params(self, pm) -> list[torch.Tensor]:
        # Stage 1 sends psi_t; stage 2 sends the own expert psi_1, the same module; with
        # CT-CLIP every CLIP MLP's psi_t follows the connector's, aggregated alike.
        return [p for m in pm.pilot_modules() for p in m.task_adapter.parameters()]

    def text_params(self, pm) -> list[torch.Tensor]:
        return [p for _, p in pm.lora_named_parameters()]

    def shared_rows(self, num_tasks: int) -> int:
        return num_tasks

    def begin_round(self, pm, round_: int, start_state) -> None:
        # Stage-2 entry: cross-task adapters from the (aggregated) own task adapter.
        if self.stage(round_) == 2:
            for m in pm.pilot_modules():
                if not m.cross_ready:
                    m.init_cross_adapters()

    @property
    def needs_gram(self) -> bool:
        return self.cfg.pilot.selection == "topm"

    def plan(self, n, tasks, num_tasks, good, gram) -> MixPlan:
        shared = aggregate.task_aware_coefficients(n, tasks, num_tasks, good)  # [T, K]
        if good.any():
            personal = SELECTIONS[self.cfg.pilot.selection](self.cfg, n, tasks, num_tasks, good, gram)  # [K, K]
        else:
            personal = torch.zeros(len(n), len(n), dtype=torch.float64)
        personal[~good.cpu()] = float("nan")  # an excluded client installs nothing
        return MixPlan(shared=shared, personal=personal, excluded=(~good).nonzero().flatten().tolist())

    def install(self, pm, shared, personal, round_) -> None:
        for t in range(shared.shape[0]):
            if torch.isfinite(shared[t]).all():  # NaN row: no good client of task t this round
                # Task t's adapter goes to the own expert (t = own task) or to foreign
                # expert t, in every module, in visual_params' order.
                unflatten_into(shared[t], [p for m in pm.pilot_modules() for p in _task_module(m, t).parameters()])
        unflatten_into(personal, self.text_params(pm))
