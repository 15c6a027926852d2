"""Privacy accounting: the one module that imports Google's `dp_accounting`.

A run with privacy.where != none releases, per round, the Gaussian mechanism with noise
multiplier z (noise std z * C on a sum of changes each clipped to C in L2) applied to a
subset of the clients. It is accounted as a PoissonSampledDpEvent(q, GaussianDpEvent(z))
per round (q the participation rate; q = 1: the Gaussian event alone), self-composed over
the rounds, with the add-or-remove-one-client neighbouring relation, by the RDP or the
PLD accountant. Every function here is pure: the same arguments give the same epsilon on
every rank and after a resume, so no accountant state needs to travel or be checkpointed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import dp_accounting
from dp_accounting import pld, rdp


@contextlib.contextmanager
def _quiet():
    """The RDP accountant warns (through absl) for every Renyi order whose series does not
    converge and then leaves that order out, which only makes its bound looser; at
    small sampling rates that is dozens of lines per call, which would bury the run's log."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def round_event(noise_multiplier: float, rate: float) -> dp_accounting.DpEvent:
    """One round: the Gaussian mechanism on the round's participants, sampled at `rate`."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return gaussian if rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(rate, gaussian)


def run_event(noise_multiplier: float, rate: float, rounds: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(round_event(noise_multiplier, rate), rounds)


def _accountant(kind: str):
    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant()
    raise ValueError(f"unknown accountant {kind!r}")


@functools.lru_cache(maxsize=None)
def epsilon(noise_multiplier: float, rate: float, rounds: int, delta: float, kind: str = "rdp") -> float:
    """Cumulative epsilon at `delta` after `rounds` rounds (inf without noise; 0 for 0 rounds)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    with _quiet():
        acc = _accountant(kind)
        acc.compose(run_event(noise_multiplier, rate, rounds))
        return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=None)
def calibrate(target_epsilon: float, rate: float, rounds: int, delta: float, kind: str = "rdp") -> float:
    """The smallest noise multiplier (to dp_accounting's search tolerance) whose epsilon after
    `rounds` rounds is at most `target_epsilon` at `delta`.

    PLD is searched between a quarter of RDP's answer and RDP's answer (PLD's epsilon is
    the tighter one, so its multiplier is the smaller): from a tiny multiplier, as an
    open search would start, its discretised loss distribution takes tens of GiB."""
    with _quiet():
        if kind == "pld":
            upper = calibrate(target_epsilon, rate, rounds, delta, "rdp")
            bracket = dp_accounting.ExplicitBracketInterval(upper / 4, upper)
        else:
            bracket = dp_accounting.LowerEndpointAndGuess(1e-2, 1.0)
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(kind), lambda z: run_event(z, rate, rounds), target_epsilon, delta,
            bracket_interval=bracket))
