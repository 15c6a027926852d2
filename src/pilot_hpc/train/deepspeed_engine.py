"""DeepSpeed local training of one client (`train.engine: deepspeed`).

The same contract as the torch engine (same seeded batch order, loss terms, clipping,
non-finite handling and TrainResult), run through a DeepSpeed engine: ZeRO
stage 0/1/2 over the trainable parameters only (the frozen base is never optimizer
state), float32 master weights (the trainable parameters are float32 in a bf16 model), optional optimizer
offload to CPU, and data parallel over the ranks of one client (a ClientGroup).

This is the only module that imports deepspeed, and it does so inside functions, so
that importing it stays cheap.

Process group: each process joins exactly one torch.distributed world, its client's
(RANK = group.rank, WORLD_SIZE = group.size). The leader picks a free port and the
members learn it through group.share; the world is set up on the first call and
reused by every later one (DeepSpeed's data-parallel group is that whole world).
"""

from __future__ import annotations

import logging
import os
import socket

import torch

from pilot_hpc.data.records import answer_tokens
from pilot_hpc.train.activations import checkpointing
from pilot_hpc.train.loader import micro_batch_stream
from pilot_hpc.train.schedule import set_lr
from pilot_hpc.train.spec import (ClientGroup, Hooks, StepLog, TrainProgress, TrainResult, TrainSpec, batches,
                                  micro_batches, warn_non_finite, weighted_terms)

log = logging.getLogger("pilot_hpc.engine")

# DeepSpeed's default ZeRO bucket is 5e8 elements, and ZeRO-2 reserves two of them
# (overlap_comm) per engine: 4 GB in fp32 for a few MB of adapters. Buckets are sized
# to the trainable parameters instead, capped at DeepSpeed's default.
MAX_BUCKET = 500_000_000


def _deepspeed(device: torch.device):
    """Import deepspeed with the accelerator that matches the model's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator, set_accelerator

    name = get_accelerator().device_name()
    if device.type == "cpu" and name != "cpu":
        # A GPU machine running the model on CPU (run.device=cpu): DeepSpeed would
        # otherwise move the model to the GPU.
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
    elif device.type != "cpu" and name != device.type:
        raise RuntimeError(f"the model is on {device} but DeepSpeed selected its {name!r} accelerator: "
                           "set DS_ACCELERATOR to match run.device")
    return deepspeed


def _free_endpoint() -> tuple[str, int]:
    """The leader's host name and a port that was free a moment ago (bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return socket.gethostname(), port


def ensure_world(group: ClientGroup, device: torch.device) -> None:
    """This client's torch.distributed world, set up once per process and then reused."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_available() and dist.is_initialized():
        if (dist.get_world_size(), dist.get_rank()) != (group.size, group.rank):
            raise RuntimeError(f"this process already joined a torch.distributed world as rank "
                               f"{dist.get_rank()} of {dist.get_world_size()}, but its client group is rank "
                               f"{group.rank} of {group.size}: a process trains in one client group only")
        if dist.get_backend() != backend:
            raise RuntimeError(f"the client's torch.distributed world uses {dist.get_backend()}, but a model on "
                               f"{device} needs {backend}: keep one device per process")
        return
    host, port = group.share(_free_endpoint() if group.rank == 0 else None)
    local_rank = (device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else group.rank
    os.environ.update(MASTER_ADDR=str(host), MASTER_PORT=str(port), RANK=str(group.rank),
                      WORLD_SIZE=str(group.size), LOCAL_RANK=str(local_rank))
    deepspeed = _deepspeed(device)
    # auto_mpi_discovery=False: under mpiexec DeepSpeed would otherwise build its world
    # from MPI.COMM_WORLD (all clients) instead of this client's group.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               rank=group.rank, world_size=group.size)
    log.info("client group world: rank %d of %d, %s at %s:%d", group.rank, group.size, backend, host, port)


def ds_config(*, batch_size: int, group_size: int, lr: float, weight_decay: float, grad_clip: float,
              zero_stage: int, offload_optimizer: bool, bf16: bool, device: torch.device,
              bucket: int, grad_accum_steps: int = 1) -> dict:
    """The DeepSpeed config of one client's local round (batch_size per member, split
    into grad_accum_steps micro-batches)."""
    optimizer = {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8}
    if device.type == "cpu" and not offload_optimizer:
        # torch.optim.AdamW (the torch engine's optimiser) instead of DeepSpeed's CPU
        # FusedAdam, which is a C++ op compiled on first use; on GPU DeepSpeed's fused
        # AdamW runs, with offload its CPU AdamW (DeepSpeedCPUAdam).
        optimizer["torch_adam"] = True
    zero: dict = {"stage": zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": batch_size // grad_accum_steps,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": batch_size * group_size,
        "gradient_clipping": float(grad_clip) if grad_clip > 0 else 0.0,
        "optimizer": {"type": "AdamW", "params": optimizer},
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }


def _release(engine) -> None:
    """Detach a finished engine from the model: the ZeRO gradient hooks on the trainable
    parameters and the engine's forward hooks on the module would otherwise outlive it
    (and fire in the next client's round or in evaluation)."""
    engine.destroy()
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        hook = getattr(engine, name, None)
        if hook is not None:
            hook.remove()
            setattr(engine, name, None)


def _my_slice(idx: list[int], rank: int, size: int) -> tuple[list[int], int]:
    """Member `rank`'s contiguous share of a global batch and its number of samples.

    Full batches split into equal slices; a short last batch into slices that differ by
    at most one. A member left with no sample (fewer samples than members) still runs
    forward and backward, on the first sample with weight 0, since every member must
    join the gradient reduction of every step."""
    lo, hi = rank * len(idx) // size, (rank + 1) * len(idx) // size
    return (idx[lo:hi], hi - lo) if hi > lo else (idx[:1], 0)


def train(model: torch.nn.Module, dataset, params: list[torch.nn.Parameter], spec: TrainSpec, *, pad_id: int,
          device: torch.device, hooks: Hooks, resume: TrainProgress | None, group: ClientGroup) -> TrainResult:
    """One local round through a DeepSpeed engine built for this call.

    Data parallel: every step takes a global batch of group.size x batch_size samples
    from the seeded order, member r the r-th contiguous slice; the gradients are
    averaged over the group. The cross-entropy of each member is weighted by its share
    of the global batch's answer tokens, so the averaged gradient is that of the global
    batch's token-mean loss (what one process with the whole batch computes); the
    auxiliary terms by the member's share of the samples. Every member reports the
    group's losses and ends with the same parameters.

    Precision: the trainable parameters are float32 master weights in a model of any
    dtype (model/build.py), so DeepSpeed runs without its bf16 mode and optimises them
    in float32 like the torch engine (its bf16 mode would cast the whole module, the
    float32 connector and LoRA included, to bf16 for good). Only bf16 trainable
    parameters (a caller that made them so) turn DeepSpeed's bf16 mode on.

    Preemption: when should_stop(step) says stop on any member, the run returns
    `stopped = TrainProgress.restart(<RNG state at this call's start>)`, which means "restart this client's round from its
    start": DeepSpeed's partitioned optimizer state is not carried over, so the caller
    restores the parameters of the round's start and calls again (a `resume` with step 0
    starts fresh). The per-step losses and the model are left as they were at the stop.

    Unreadable samples (spec.on_bad_sample): skip leaves them out (the ce stays the token
    mean of what remains; their share of the auxiliary terms is dropped for that step);
    fail, or a member's micro-batch with no readable sample left, stops the group the
    same way, with result.bad_sample set on the member that read it.
    """
    if resume is not None and resume.step != 0:
        raise ValueError(f"the deepspeed engine restarts an interrupted round from its start, but resume is at "
                         f"step {resume.step} (progress of the torch engine?): resume with train.engine=torch "
                         "or restart the round")
    if spec.zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2, got {spec.zero_stage}")
    if spec.offload_optimizer and spec.zero_stage == 0:
        raise ValueError("offload_optimizer needs ZeRO: set train.zero_stage=1 or 2")
    dtype = next(model.parameters()).dtype
    if dtype == torch.float16:
        raise ValueError("the deepspeed engine trains float32 or bfloat16 models (fp16 would need loss scaling): "
                         "set model.dtype=bfloat16 or float32")
    rng_at_start = torch.get_rng_state()
    ensure_world(group, device)
    deepspeed = _deepspeed(device)
    numel = sum(p.numel() for p in params)
    config = ds_config(batch_size=spec.batch_size, group_size=group.size, lr=spec.lr,
                       weight_decay=spec.weight_decay, grad_clip=spec.grad_clip, zero_stage=spec.zero_stage,
                       offload_optimizer=spec.offload_optimizer,
                       bf16=any(p.dtype == torch.bfloat16 for p in params), device=device,
                       bucket=max(1, min(numel, MAX_BUCKET)),
                       grad_accum_steps=spec.grad_accum_steps)
    gen = torch.Generator().manual_seed(spec.seed)
    for p in params:  # DeepSpeed accumulates into .grad: a grad left by an earlier round would leak in
        p.grad = None
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    try:
        # Dropout (LoRA) draws after the engine is built, as the torch engine's do after
        # its AdamW (which draws nothing): group size 1 reproduces it. Members draw
        # different masks, as their samples differ.
        torch.manual_seed(spec.seed if group.rank == 0 else (spec.seed + 7919 * group.rank) % 2 ** 31)
        model.train()
        with checkpointing(model, spec.gradient_checkpointing):
            return _run(engine, dataset, group, gen, spec, pad_id=pad_id, device=device, hooks=hooks,
                        rng_at_start=rng_at_start)
    finally:
        model.eval()
        _release(engine)


def _run(engine, dataset, group: ClientGroup, gen: torch.Generator, spec: TrainSpec, *, pad_id: int,
         device: torch.device, hooks: Hooks, rng_at_start: torch.Tensor) -> TrainResult:
    import torch.distributed as dist

    R, A = group.size, spec.grad_accum_steps
    steps = StepLog()
    result = steps.result
    plan = list(batches(len(dataset), spec.batch_size * R, spec.epochs, spec.max_steps, gen))
    total = len(plan)
    mine = [_my_slice(idx, group.rank, R) for idx in plan]  # (indices, samples of this member)
    # DeepSpeed's accumulation counts A micro-batches per step: a member always runs A
    # (a slice shorter than A repeats its last sample with weight 0).
    parts = [_micro_slices(m, m_r, A) for m, m_r in mine]
    stream = micro_batch_stream(dataset, [p for step in parts for p, _ in step], pad_id=pad_id,
                                num_workers=spec.num_workers, device=device)
    try:
        for i, idx in enumerate(plan):
            # This member's micro-batches first: an unreadable sample (on_bad_sample=fail,
            # or a micro-batch left empty by skip, which has nothing to run the forward on)
            # stops the whole group, like a signal on any member, before anyone steps.
            fetched = [next(stream) for _ in parts[i]]
            # A skipped sample leaves its micro-batch's weight (its share of the auxiliary
            # terms; the ce is weighted by the tokens that remain, exactly).
            weights = [max(0, m - len(b.get("unreadable", []))) for b, (_, m) in zip(fetched, parts[i])]
            emptied = [b["unreadable"][0] for b in fetched if "input_ids" not in b]
            mbs = steps.readable(fetched, spec.on_bad_sample)
            if mbs is not None and emptied:
                result.bad_sample = (f"every sample of a micro-batch of step {i} is unreadable, which the deepspeed "
                                     f"engine cannot skip (its members step together); the first: {emptied[0]}")
                mbs = None
            stop = float(mbs is None or (hooks.should_stop is not None and bool(hooks.should_stop(i))))
            stop = torch.tensor([stop], device=device)
            if R > 1:  # any member's stop stops the whole group (no member waits alone)
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop.item():
                result.stopped = TrainProgress.restart(rng_at_start)
                break
            set_lr(engine.optimizer, spec.lr, i, total, spec.lr_schedule, spec.warmup_ratio)
            if A == 1:
                shown = _step(engine, mbs[0], weights[0], len(idx), R, hooks, i)
            else:
                shown = _accumulated_step(engine, list(zip(mbs, weights)), len(idx), R, hooks, i, device)
            if shown is None:
                result.finite = False
                break
            steps.record(shown, len(idx), hooks)
        if R > 1:  # the client's count: every member's skipped samples (all members get here together)
            skipped = torch.tensor([float(result.skipped)], dtype=torch.float64, device=device)
            dist.all_reduce(skipped)
            result.skipped = int(skipped.item())
    finally:
        stream.close()
    return steps.finish()


def _micro_slices(idx: list[int], m_r: int, A: int) -> list[tuple[list[int], int]]:
    """A member's slice as A (indices, samples) micro-batches; padding ones have weight 0."""
    real = micro_batches(idx[:m_r], A) if m_r else []
    return [(p, len(p)) for p in real] + [(idx[-1:], 0)] * (A - len(real))


def _step(engine, batch: dict, m_r: int, M: int, R: int, hooks: Hooks, i: int) -> dict | None:
    """One step without accumulation: one micro-batch per member, weighted only across
    the client group (by _group_terms, when it has more than one member)."""
    out = engine(**batch)
    terms = {"ce": out.loss, **hooks.aux_loss()}
    if R > 1:
        terms, shown = _group_terms(terms, batch["labels"], m_r, M, R)
    else:
        shown = terms
    loss = sum(terms.values())
    total = loss if R == 1 else sum(shown.values())  # the group's: non-finite on all members or none
    if not torch.isfinite(total):
        warn_non_finite(i, shown)
        return None
    engine.backward(loss)
    engine.step()
    return shown


def _accumulated_step(engine, mbs: list[tuple[dict, int]], M: int, R: int, hooks: Hooks, i: int,
                      device: torch.device) -> dict | None:
    """One step over A micro-batches (engine.backward and engine.step per micro-batch;
    DeepSpeed reduces and steps at the A-th). Member r's micro-batch j: ce weighted by
    R n_rj / N (N: the global batch's answer tokens, one all-reduce up front), auxiliary
    terms by R m_rj / M; DeepSpeed's own 1/A scaling is off (scale_wrt_gas=False), so the
    group-averaged sum is the gradient of the global batch's loss."""
    import torch.distributed as dist

    counts = [float(answer_tokens(b["labels"])) if m else 0.0 for b, m in mbs]
    N = torch.tensor([sum(counts)], dtype=torch.float64, device=device)
    if R > 1:
        dist.all_reduce(N)
    N = float(N)
    shown: dict[str, torch.Tensor] = {}
    for (batch, m), n in zip(mbs, counts):
        out = engine(**batch)
        raw = {"ce": out.loss, **hooks.aux_loss()}
        terms = weighted_terms(raw, n, N, m, M, members=R)
        # What the group reports: the members' weighted terms summed (divided by R).
        part = {k: v.detach().double() / R for k, v in terms.items()}
        # A weight-0 micro-batch's NaN counts too: 0 x NaN would still poison the gradient.
        finite = bool(torch.isfinite(torch.stack([v.detach() for v in raw.values()])).all())
        values = torch.stack(list(part.values())) if m else torch.zeros(len(part), dtype=torch.float64, device=device)
        stats = torch.cat([torch.tensor([0.0 if finite else 1.0], dtype=torch.float64, device=device), values])
        if R > 1:
            dist.all_reduce(stats)
        if stats[0] > 0:
            warn_non_finite(i, raw)
            return None
        for j, k in enumerate(part):
            shown[k] = shown[k] + stats[1 + j].float() if k in shown else stats[1 + j].float()
        engine.backward(sum(terms.values()), scale_wrt_gas=False)
        engine.step()
    return shown



def _group_terms(terms: dict[str, torch.Tensor], labels: torch.Tensor, m_r: int, M: int,
                 R: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(this member's weighted terms to backpropagate, the group's terms to report).

    DeepSpeed averages gradients over the R members. The member's ce, a mean over its
    n_r answer tokens, is weighted by R n_r / N (N: the global batch's answer tokens),
    so the average is the gradient of the global batch's token-mean ce; an auxiliary
    term by R m_r / M (m_r of the M samples), exact for per-sample means such as L_d.
    One all-reduce carries the token counts, the terms and a non-finite flag, so every
    member takes the same decision at a NaN (a weight-0 slice's too: 0 x NaN = NaN
    would still poison the averaged gradient)."""
    import torch.distributed as dist

    names = list(terms)
    n_r = float(answer_tokens(labels)) if m_r else 0.0
    raw = [terms[k].detach().double() for k in names]
    bad = 0.0 if bool(torch.isfinite(torch.stack(raw)).all()) else 1.0
    stats = torch.tensor([n_r, bad] + [0.0] * len(names), dtype=torch.float64, device=labels.device)
    if m_r:
        stats[2:] = torch.stack([raw[0] * n_r] + [v * m_r for v in raw[1:]])
    dist.all_reduce(stats)
    N = float(stats[0])
    weighted = weighted_terms(terms, n_r, N, m_r, M, members=R)
    shown = {"ce": (stats[2] / N).float()}
    shown.update({k: (stats[3 + j] / M).float() for j, k in enumerate(names[1:])})
    if stats[1] > 0:  # some member's loss is NaN/Inf: so is the group's
        shown["ce"] = torch.full_like(shown["ce"], float("nan"))
    return weighted, shown
