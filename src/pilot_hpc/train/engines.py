"""The registry of local-training engines and the one call that runs a round.

An engine is a module with `train(model, dataset, params, spec, *, pad_id, device,
hooks, resume, group) -> TrainResult`. Engines are imported by name when first used,
so that the deepspeed engine (the only deepspeed importer) costs nothing until a
config asks for it, and no engine imports its caller.
"""

from __future__ import annotations

import importlib

import torch

from pilot_hpc.train.spec import SOLO, ClientGroup, Hooks, TrainProgress, TrainResult, TrainSpec

ENGINES = {
    "torch": "pilot_hpc.train.torch_engine",  # plain AdamW in this process
    "deepspeed": "pilot_hpc.train.deepspeed_engine",  # ZeRO, offload, data parallel client groups
}


def train_steps(model: torch.nn.Module, dataset, params: list[torch.nn.Parameter], spec: TrainSpec, *,
                pad_id: int, device: torch.device = torch.device("cpu"), hooks: Hooks = Hooks(),
                resume: TrainProgress | None = None, group: ClientGroup = SOLO) -> TrainResult:
    """AdamW over `params` for one local round (fresh each round: the optimiser state
    does not cross rounds).

    When hooks.should_stop says yes the run returns with `stopped` set, and passing
    that back as `resume` continues exactly where it stopped (same batches, dropout and
    optimiser state). An engine that cannot continue mid-round (deepspeed) returns a
    progress at step 0: "restart this client's round from its start".
    """
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    if spec.engine not in ENGINES:
        raise ValueError(f"train.engine must be {' or '.join(ENGINES)}, got {spec.engine!r}")
    engine = importlib.import_module(ENGINES[spec.engine])
    return engine.train(model, dataset, params, spec, pad_id=pad_id, device=device, hooks=hooks, resume=resume,
                        group=group)
