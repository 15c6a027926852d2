"""Pilot: task-aware aggregation of the task adapters, ATA top-M for the LoRA."""

from __future__ import annotations

import logging

import torch

from pilot_hpc.config import padded_client_ranks
from pilot_hpc.fl import aggregate, lora_distance
from pilot_hpc.fl.client import truncate_hosted
from pilot_hpc.fl.flat import flatten, unflatten_into
from pilot_hpc.fl.strategies.base import Aggregator, ClientPolicy, MixPlan, register

log = logging.getLogger("pilot_hpc.fl")


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


# Beyond this many clients a round's entry keeps ATA's neighbours but not the K x K distances.
RECORD_DISTANCES_UP_TO = 64


def ata_record(gram: torch.Tensor, good: torch.Tensor, top_m: int, distance: str) -> dict:
    """ATA's choice of the round, for metrics.json: per client the M nearest good clients
    (client ids, nearest first; None for a client left out) and the distances they were
    chosen on (pilot.distance; None where a client was left out), as aggregate.ata_mixing
    chooses them."""
    k = len(good)
    rows = good.cpu().nonzero().flatten().tolist()
    neighbours: list = [None] * k
    dist: list = [[None] * k for _ in range(k)]
    if len(rows) > 1:
        sub = aggregate.distances_from_gram(gram.cpu()[rows][:, rows])
        for i, near in enumerate(aggregate.nearest_clients(sub, min(top_m, len(rows) - 1))):
            neighbours[rows[i]] = [rows[j] for j in near]
        for i, a in enumerate(rows):
            for j, b in enumerate(rows):
                dist[a][b] = float(sub[i, j])
    out = {"distance": distance, "neighbours": neighbours}
    if k <= RECORD_DISTANCES_UP_TO:
        out["distances"] = dist
    return {"ata": out}


class PilotClient(ClientPolicy):
    def __init__(self, cfg):
        super().__init__(cfg)
        # zero_pad (model.lora_ranks): each client's rank; None when every client has the model's.
        self.ranks = padded_client_ranks(cfg)

    def stage(self, round_: int) -> int:
        return 1 if round_ == 1 else 2

    def shared_params(self, pm) -> list[torch.Tensor]:
        # Stage 1 sends psi_t; stage 2 sends the own expert psi_1, the same module; with
        # CT-CLIP every CLIP MLP's psi_t follows the connector's, aggregated alike.
        return [p for m in pm.pilot_modules() for p in m.task_adapter.parameters()]

    def personal_params(self, pm) -> list[torch.Tensor]:
        return [p for _, p in pm.lora_named_parameters()]

    def begin_round(self, pm, round_: int, start_state) -> None:
        # Before local training: a client of a smaller rank starts from the model's padded
        # initial LoRA (and a resumed one from what it had: zeroing is idempotent).
        truncate_hosted(pm, self.ranks)
        # Stage-2 entry: cross-task adapters from the (aggregated) own task adapter.
        if self.stage(round_) == 2:
            for m in pm.pilot_modules():
                if not m.cross_ready:
                    m.init_cross_adapters()

    def install(self, pm, shared, personal) -> None:
        for t in range(shared.shape[0]):
            if torch.isfinite(shared[t]).all():  # NaN row: no good client of task t this round
                # Task t's adapter goes to the own expert (t = own task) or to foreign
                # expert t, in every module, in shared_params' order.
                unflatten_into(shared[t], [p for m in pm.pilot_modules() for p in _task_module(m, t).parameters()])
        if personal is not None:  # None: it sat the round out and keeps its own LoRA
            unflatten_into(personal, self.personal_params(pm))
            truncate_hosted(pm, self.ranks)  # zero_pad: the mix of padded rows, back to the client's rank

    def install_start(self, pm, rows: int) -> torch.Tensor:
        # Row t installs into the own expert (t = own task) or foreign expert t.
        return torch.stack([flatten([p for m in pm.pilot_modules() for p in _task_module(m, t).parameters()])
                            for t in range(rows)])

    def sat_out(self, pm, round_: int) -> None:
        # A client that has not taken part since stage 1 enters stage 2 here, its cross-task
        # adapters from the own task adapter just installed (the latest aggregated one).
        self.begin_round(pm, round_, None)


class PilotServer(Aggregator):
    """Task-aware averaging of the task adapters (one row per task) and, for the LoRA,
    pilot.selection: ATA's top-M (needs the Gram matrix), same-task or all."""

    def shared_rows(self) -> int:
        return self.num_tasks

    spans: list | None = None  # pilot.distance=product: the LoRA modules in the personal row
    record: dict = {}  # the last plan's ATA choice (round_record)

    @property
    def needs_gram(self) -> bool:
        return self.cfg.pilot.selection == "topm"

    def attach(self, pm) -> None:
        if self.cfg.pilot.distance == "product":
            self.spans = lora_distance.model_layout(pm)

    def gram_accumulator(self, k: int, device):
        if self.cfg.pilot.distance != "product":
            return None
        if self.spans is None:
            raise RuntimeError("pilot.distance=product: the aggregator was not attached to the model "
                               "(Aggregator.attach), so it does not know where the LoRA factors are")
        return lora_distance.ProductGram(self.spans, k, device)

    def plan(self, n, good, gram) -> MixPlan:
        shared = aggregate.task_aware_coefficients(n, self.tasks, self.num_tasks, good)  # [T, K]
        m, usable = self.cfg.pilot.top_m, int(good.sum())
        if self.cfg.pilot.selection == "topm" and 1 < usable <= m:
            # aggregate.ata_mixing caps M at the usable clients less one (sampling, exclusions).
            log.info("ATA: %d clients took part, so each mixes its %d nearest (pilot.top_m=%d capped)",
                     usable, usable - 1, m)
        self.record = {}
        if self.cfg.pilot.selection == "topm" and gram is not None:
            self.record = ata_record(gram, good, m, self.cfg.pilot.distance)
        if good.any():
            personal = SELECTIONS[self.cfg.pilot.selection](self.cfg, n, self.tasks, self.num_tasks, good, gram)  # [K, K]
        else:
            personal = torch.zeros(len(n), len(n), dtype=torch.float64)
        personal[~good.cpu()] = float("nan")  # an excluded client installs nothing
        return MixPlan(shared=shared, personal=personal, excluded=(~good).nonzero().flatten().tolist())

    def round_record(self) -> dict:
        return self.record


register("pilot", PilotClient, PilotServer)
