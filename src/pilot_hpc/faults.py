"""Fault injection for resilience tests: PILOT_HPC_INJECT="kind:key=value,...;kind:...".

Real failures are rare and untimed, so the tests that show the suite survives them
make them happen at a chosen place through the same code paths:
  sigkill:rank=R,round=N,step=S   that rank sends itself SIGKILL before local step S
  sigterm:rank=R,round=N,step=S   ... SIGTERM (the preemption path through the handler)
  raise:client=K,round=N          client K's training raises RuntimeError
  nan_update:client=K,round=N     client K's update turns NaN after training
Unset (the default), every check is a dictionary lookup that finds nothing.
"""

from __future__ import annotations

import os
import signal

KINDS = ("sigkill", "sigterm", "raise", "nan_update")


def parse(text: str) -> list[tuple[str, dict[str, int]]]:
    faults = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        kind, _, args = item.partition(":")
        if kind not in KINDS:
            raise ValueError(f"PILOT_HPC_INJECT: unknown fault {kind!r}; valid: {list(KINDS)}")
        try:
            params = {k: int(v) for k, v in (a.split("=") for a in args.split(",") if a)}
        except ValueError:
            raise ValueError(f"PILOT_HPC_INJECT: {item!r} must look like kind:key=int,key=int") from None
        faults.append((kind, params))
    return faults


_FAULTS = parse(os.environ.get("PILOT_HPC_INJECT", ""))


def hit(kind: str, **where: int) -> bool:
    """True when a configured fault of `kind` matches every key it names."""
    return any(k == kind and all(where.get(key) == value for key, value in params.items())
               for k, params in _FAULTS)


def maybe_signal(rank: int, round_: int, step: int) -> None:
    if hit("sigkill", rank=rank, round=round_, step=step):
        os.kill(os.getpid(), signal.SIGKILL)
    if hit("sigterm", rank=rank, round=round_, step=step):
        os.kill(os.getpid(), signal.SIGTERM)
