"""Federated strategies, registered by name (selected with fl.strategy)."""

from __future__ import annotations

from pilot_hpc.fl.strategies.base import REGISTRY, Aggregator, ClientPolicy, Strategy, get_strategy
# Importing a strategy's module registers it under its name.
from pilot_hpc.fl.strategies import centralized, fedadam, fedavg, feddpa, fedprox, local, pilot, shepherd  # noqa: F401

__all__ = ["REGISTRY", "Aggregator", "ClientPolicy", "Strategy", "get_strategy"]
