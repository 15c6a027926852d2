"""Federated strategies, registered by name (selected with fl.strategy)."""

from __future__ import annotations

from pilot_hpc.fl.strategies.base import REGISTRY, Strategy, get_strategy
from pilot_hpc.fl.strategies import pilot  # noqa: F401  (registers "pilot")

__all__ = ["REGISTRY", "Strategy", "get_strategy"]
