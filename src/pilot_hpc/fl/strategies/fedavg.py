"""FedAvg (McMahan et al. 2017): one global model, the sample-weighted average of all
trainable parameters (the projector and the LoRA), sent back to every client.

With fl.lora_rank_rule=stack (FLoRA, fl/stack.py) the LoRA is not averaged: the server
stacks the clients' factors (each at its own rank), every rank merges their exact weighted
product into its base weights, and each participant restarts its LoRA at B = 0; the
projector is averaged as ever. FedProx shares both classes."""

from __future__ import annotations

import torch

from pilot_hpc.config import client_lora_ranks, padded_client_ranks
from pilot_hpc.fl import aggregate, lora_distance, stack
from pilot_hpc.fl.client import truncate_hosted
from pilot_hpc.fl.flat import unflatten_into
from pilot_hpc.fl.strategies.base import Aggregator, ClientPolicy, MixPlan, register
from pilot_hpc.model.connector import PLAIN


class FedAvgClient(ClientPolicy):
    """Trains the projector (the connector's task adapter) and the LoRA at stage PLAIN,
    sends both, installs the global model."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.stack = cfg.fl.lora_rank_rule == "stack"
        # stack with model.lora_ranks: each client's rank (None when all have the model's).
        self.ranks = padded_client_ranks(cfg) if self.stack else None

    def begin_round(self, pm, round_: int, start_state) -> None:
        # A client of a smaller rank trains its own components only (zeroing is idempotent,
        # so an interrupted round that resumes is unchanged).
        truncate_hosted(pm, self.ranks)

    def stage(self, round_: int) -> int:
        return PLAIN

    def shared_params(self, pm) -> list[torch.Tensor]:
        return list(pm.connector.task_adapter.parameters())

    def personal_params(self, pm) -> list[torch.Tensor]:
        return [p for _, p in pm.lora_named_parameters()]

    def install(self, pm, shared, personal) -> None:
        if torch.isfinite(shared[0]).all():
            unflatten_into(shared[0], self.shared_params(pm))
        if self.stack:  # its product is in the merged base now (federation): B = 0 restarts it
            if personal is not None:  # None: it sat the round out, and its B is still zero
                stack.restart_(pm)
            return
        if personal is not None and torch.isfinite(personal).all():
            unflatten_into(personal, self.personal_params(pm))


class FedAvgServer(Aggregator):
    global_personal = True  # plan(): every personal row is the weighted mean

    def __init__(self, cfg):
        super().__init__(cfg)
        self.stacks_lora = cfg.fl.lora_rank_rule == "stack"
        self.ranks = client_lora_ranks(cfg)
        self.spans: list | None = None  # stack: the LoRA modules of the personal row (attach)
        self.bases: dict[str, torch.Tensor] = {}  # stack: the live base weights they merge into

    def attach(self, pm) -> None:
        if self.stacks_lora:
            self.spans = lora_distance.model_layout(pm)
            self.bases = stack.base_weights(pm, self.spans)

    def server_state(self) -> dict[str, torch.Tensor]:
        # stack: the merged base weights of the LoRA target modules (every rank holds the
        # same; rank 0's are written), so a resumed run or an export starts from them.
        return stack.server_state(self.bases) if self.stacks_lora else {}

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.stacks_lora:
            stack.load_server_state(self.bases, state)
        else:
            super().load_server_state(state)

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
