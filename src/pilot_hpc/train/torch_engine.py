"""The torch engine (`train.engine: torch`): plain AdamW over the trainable parameters,
in this process, one client at a time.

The batch order and dropout come from generators seeded by the spec's seed (run seed,
client, round), so a client trains the same way on whichever rank hosts it.

Gradient accumulation (spec.grad_accum_steps = A > 1): each step's batch splits into A
micro-batches (spec.micro_batches), each forward is followed by its backward, and the
optimiser steps once. The cross-entropy is a token mean over the whole batch, so each
micro-batch's ce (a mean over its n_j answer tokens) is weighted by n_j / N (N: the
batch's answer tokens) and each auxiliary term (per-sample means: L_d, L_z, FedProx's
term, which is the same in every forward) by its share of the samples m_j / M
(spec.weighted_terms, the rule the deepspeed engine uses too). The sum of the weighted
gradients is then the gradient of the whole batch's loss, up to float rounding; stage
2's load-balance loss (a product of two token means) is approximated by the weighted
mean of the micro-batches' values. With A = 1 the step is one forward and backward of
the batch's loss, with no weights.

Unreadable samples (spec.on_bad_sample): skip leaves them out of their micro-batch, so
the step's loss is the mean over the samples that remain (a step with none left takes
no update but still counts, so the schedule and a resume keep their step numbers);
fail stops the round before that step with the same progress a stop request gives.
"""

from __future__ import annotations

import torch

from pilot_hpc.data.records import answer_tokens
from pilot_hpc.train.activations import checkpointing
from pilot_hpc.train.loader import micro_batch_stream
from pilot_hpc.train.schedule import set_lr
from pilot_hpc.train.spec import (ClientGroup, Hooks, StepLog, TrainProgress, TrainResult, TrainSpec, batches,
                                  load_optimizer_state, micro_batches, optimizer_state, warn_non_finite,
                                  weighted_terms)


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
    # The whole round's batches up front (the same draws from `gen` as drawing them one
    # by one): the schedule needs the total, the loader the index lists from the first
    # step not yet done.
    plan = list(batches(len(dataset), spec.batch_size, spec.epochs, spec.max_steps, gen))
    total, first = len(plan), steps.result.steps
    parts = [micro_batches(idx, spec.grad_accum_steps) for idx in plan]
    stream = micro_batch_stream(dataset, [p for step in parts[first:] for p in step], pad_id=pad_id,
                                num_workers=spec.num_workers, device=device)
    try:
        with checkpointing(model, spec.gradient_checkpointing):
            for i in range(first, total):
                if i > 0 and hooks.out_of_time is not None and hooks.out_of_time(i):
                    steps.result.timed_out = True
                    break
                stop = hooks.should_stop is not None and hooks.should_stop(i)
                mbs = None if stop else steps.readable([next(stream) for _ in parts[i]], spec.on_bad_sample)
                if mbs is None:  # a stop request, or an unreadable sample with on_bad_sample=fail
                    steps.result.stopped = TrainProgress(step=i, samples=steps.result.samples, sums=dict(steps.sums),
                                                         optimizer=optimizer_state(opt),
                                                         torch_rng=torch.get_rng_state(),
                                                         skipped=steps.result.skipped)
                    break
                set_lr(opt, spec.lr, i, total, spec.lr_schedule, spec.warmup_ratio)
                if not mbs:  # every sample of this step was unreadable (skipped): no update
                    steps.record({}, 0, hooks)
                    continue
                terms = _step(model, opt, params, mbs, spec, hooks, i)
                if terms is None:
                    steps.result.finite = False
                    break
                steps.record(terms, sum(b["input_ids"].shape[0] for b in mbs), hooks)
    finally:
        stream.close()
        model.eval()
    return steps.finish()


def _step(model, opt, params, mbs: list[dict], spec: TrainSpec, hooks: Hooks, i: int) -> dict | None:
    """One optimiser step over its micro-batches: the batch's loss terms, None at a NaN/Inf."""
    if len(mbs) == 1:  # no accumulation: the batch's own loss, nothing to weight
        out = model(**mbs[0])
        terms = {"ce": out.loss, **hooks.aux_loss()}
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            warn_non_finite(i, terms)
            return None
        opt.zero_grad(set_to_none=True)
        loss.backward()
    else:
        counts = [answer_tokens(b["labels"]) for b in mbs]
        sizes = [b["input_ids"].shape[0] for b in mbs]
        N, M = sum(counts), sum(sizes)
        opt.zero_grad(set_to_none=True)
        terms = {}
        for b, n_j, m_j in zip(mbs, counts, sizes):
            out = model(**b)
            # Every record has answer tokens (an eos at least), so n_j > 0.
            part = weighted_terms({"ce": out.loss, **hooks.aux_loss()}, n_j, N, m_j, M)
            loss = sum(part.values())
            if not torch.isfinite(loss):
                warn_non_finite(i, part)
                opt.zero_grad(set_to_none=True)
                return None
            loss.backward()
            for k, v in part.items():
                terms[k] = terms[k] + v.detach() if k in terms else v.detach()
    if spec.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
    opt.step()
    return terms
