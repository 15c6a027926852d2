"""The torch engine (`train.engine: torch`): plain AdamW over the trainable parameters,
in this process, one client at a time.

The batch order and dropout come from generators seeded by the spec's seed (run seed,
client, round), so a client trains the same way on whichever rank hosts it.
"""

from __future__ import annotations

import logging

import torch

from pilot_hpc.data.records import collate_train
from pilot_hpc.train.spec import (ClientGroup, Hooks, StepLog, TrainProgress, TrainResult, TrainSpec, batches,
                                  load_optimizer_state, optimizer_state)

log = logging.getLogger("pilot_hpc.train")


def train(model: torch.nn.Module, dataset, params: list[torch.nn.Parameter], spec: TrainSpec, *, pad_id: int,
          device: torch.device, hooks: Hooks, resume: TrainProgress | None, group: ClientGroup) -> TrainResult:
    if group.size > 1:
        raise ValueError(f"a client group of {group.size} ranks trains data-parallel only with engine=deepspeed")
    gen = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)  # dropout in LoRA
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    model.train()
    steps = StepLog(resume)
    if resume is not None:
        load_optimizer_state(opt, resume.optimizer)
        torch.set_rng_state(resume.torch_rng)
    for i, idx in enumerate(batches(len(dataset), spec.batch_size, spec.epochs, spec.max_steps, gen)):
        if i < steps.result.steps:  # replay the data order up to where the run stopped
            continue
        if hooks.should_stop is not None and hooks.should_stop(i):
            steps.result.stopped = TrainProgress(step=i, samples=steps.result.samples, sums=dict(steps.sums),
                                                 optimizer=optimizer_state(opt), torch_rng=torch.get_rng_state())
            break
        batch = collate_train([dataset[j] for j in idx], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        terms = {"ce": out.loss, **hooks.aux_loss()}
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            log.warning("non-finite loss at step %d (%s): stopping this client's round", i,
                        ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
            steps.result.finite = False
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        opt.step()
        steps.record(terms, len(idx), hooks)
    model.eval()
    return steps.finish()
