"""Fault injection for resilience tests: PILOT_HPC_INJECT="kind:key=value,...;kind:...".

Real failures are rare and untimed, so the tests that show the suite survives them
make them happen at a chosen place through the same code paths:
  sigkill:rank=R,round=N,step=S   that rank sends itself SIGKILL before local step S
  sigterm:rank=R,round=N,step=S   ... SIGTERM (the preemption path through the handler)
  raise:client=K,round=N          client K's training raises RuntimeError
  raise_build:rank=R              that rank's model build (main.build_model) raises ValueError:
                                  a bug, not bad input (exit 1 with a traceback, never exit 2)
  nan_update:client=K,round=N     client K's update turns NaN after training
  sigusr2:rank=R,round=N,step=S   ... SIGUSR2 (Slurm's and submitit's warning signal)
Every fault may also name restart=C: it then fires only in the C-th run of a requeued
Slurm job (SLURM_RESTART_COUNT; 0 outside Slurm), so a requeued job does not repeat it.
Unset (the default), every check is a dictionary lookup that finds nothing.
"""

from __future__ import annotations

import os
import signal

KINDS = ("sigkill", "sigterm", "sigusr2", "raise", "nan_update", "raise_build")


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
    if not _FAULTS:
        return False
    where = dict(where, restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")))
    return any(k == kind and all(where.get(key) == value for key, value in params.items())
               for k, params in _FAULTS)


def maybe_signal(rank: int, round_: int, step: int) -> None:
    if hit("sigkill", rank=rank, round=round_, step=step):
        os.kill(os.getpid(), signal.SIGKILL)
    if hit("sigterm", rank=rank, round=round_, step=step):
        os.kill(os.getpid(), signal.SIGTERM)
    if hit("sigusr2", rank=rank, round=round_, step=step):
        os.kill(os.getpid(), signal.SIGUSR2)
