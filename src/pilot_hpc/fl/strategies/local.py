"""Local training: every client trains its own projector and LoRA; nothing is exchanged."""

from __future__ import annotations

from pilot_hpc.fl.strategies.base import register
from pilot_hpc.fl.strategies.fedavg import FedAvgClient

# FedAvg's client (stage PLAIN, projector and LoRA trained) with no aggregator: no exchange.
register("local", FedAvgClient, None)
