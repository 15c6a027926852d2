"""What one local round of training is (the spec), how it reports back (hooks, result),
and where an interrupted one stands (progress): the types every engine shares.

A leaf module (torch only): the engines, the federation and the checkpoint code all
import it, and it imports none of them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pilot_hpc.train.schedule import lr_factor

_log = logging.getLogger("pilot_hpc.train")


def seed_for(run_seed: int, client: int, round_: int) -> int:
    """The seed of one client's round: its batch order and dropout do not depend on
    which rank hosts it (so the results do not depend on the world size)."""
    return (run_seed * 1_000_003 + client * 10_007 + round_ * 101) % (2 ** 31)


def lr_field(stage: int, train=None) -> str:
    """The train-section key whose value is a stage's learning rate: lr_stage1 in Pilot's
    stage 1, lr_stage2 in its stage 2, and in the baselines' stage (the connector's PLAIN,
    any stage but 1 and 2) lr_baseline when `train` (the TrainConfig) sets it above 0,
    else lr_stage2."""
    if stage == 1:
        return "lr_stage1"
    if stage != 2 and train is not None and train.lr_baseline > 0:
        return "lr_baseline"
    return "lr_stage2"


@dataclass(frozen=True)
class TrainSpec:
    """One client's local round: everything that decides what the optimiser does."""

    lr: float
    batch_size: int
    epochs: int
    seed: int
    max_steps: int = 0  # 0: `epochs` full passes; > 0: at most this many steps
    grad_clip: float = 1.0  # 0: no clipping
    weight_decay: float = 0.0
    engine: str = "torch"  # a key of pilot_hpc.train.engines.ENGINES
    zero_stage: int = 2  # deepspeed engine only
    offload_optimizer: bool = False  # deepspeed engine only
    # Each optimiser step takes grad_accum_steps micro-batches of batch_size /
    # grad_accum_steps samples (batch_size stays the effective batch).
    grad_accum_steps: int = 1
    lr_schedule: str = "constant"  # constant | cosine (train/schedule.py), over this round's steps
    warmup_ratio: float = 0.0
    gradient_checkpointing: bool = False  # non-reentrant, on the LLM's decoder layers
    # DataLoader worker processes (0: load on the training thread). Not a result field:
    # the batches are the same index lists either way.
    num_workers: int = 0
    # data.on_bad_sample, for a sample the dataset cannot read: skip (leave it out of its
    # batch, count it) or fail (stop the round before that step, like a preemption).
    on_bad_sample: str = "fail"

    def __post_init__(self):
        if self.batch_size < 1 or self.epochs < 1 or self.max_steps < 0:
            raise ValueError(f"TrainSpec: batch_size ({self.batch_size}) and epochs ({self.epochs}) must be >= 1 "
                             f"and max_steps ({self.max_steps}) >= 0")
        if self.grad_accum_steps < 1 or self.batch_size % self.grad_accum_steps:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of train.grad_accum_steps "
                             f"({self.grad_accum_steps}): the micro-batch is batch_size / grad_accum_steps")
        if self.lr_schedule not in ("constant", "cosine") or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainSpec: lr_schedule must be constant or cosine (got {self.lr_schedule!r}) and "
                             f"warmup_ratio lie in [0, 1) (got {self.warmup_ratio})")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.on_bad_sample not in ("skip", "fail"):
            raise ValueError(f"data.on_bad_sample must be skip or fail, got {self.on_bad_sample!r}")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum_steps

    @classmethod
    def for_round(cls, t, *, stage: int, seed: int, num_workers: int = 0,
                  on_bad_sample: str = "fail") -> "TrainSpec":
        """The spec of a round in `stage` from the config's `train` section (TrainConfig);
        num_workers and on_bad_sample from the data section."""
        return cls(lr=getattr(t, lr_field(stage, t)), batch_size=t.batch_size, epochs=t.local_epochs,
                   seed=seed, max_steps=t.max_steps, grad_clip=t.grad_clip, weight_decay=t.weight_decay,
                   engine=t.engine, zero_stage=t.zero_stage, offload_optimizer=t.offload_optimizer,
                   grad_accum_steps=t.grad_accum_steps, lr_schedule=t.lr_schedule, warmup_ratio=t.warmup_ratio,
                   gradient_checkpointing=t.gradient_checkpointing, num_workers=num_workers,
                   on_bad_sample=on_bad_sample)

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of optimiser step `step` (0-based) of a round of `total` steps."""
        return self.lr * lr_factor(step, total, self.lr_schedule, self.warmup_ratio)

    def steps(self, n: int, group_size: int = 1) -> int:
        """Optimisation steps of a round over n samples (global batch = group_size x batch)."""
        steps = self.epochs * math.ceil(n / (self.batch_size * group_size))
        return min(steps, self.max_steps) if self.max_steps else steps


def _no_aux() -> dict[str, torch.Tensor]:
    return {}


@dataclass(frozen=True)
class Hooks:
    """How a training run talks to its caller.

    aux_loss()        the weighted auxiliary terms of the last forward (added to the
                      cross-entropy on answer tokens); read after every forward.
    should_stop(i)    asked before step i; True ends the run with `stopped` set.
    progress(i, t)    after step i (1-based) with that step's loss terms.
    out_of_time(i)    asked before step i > 0 of the round (the first always runs, so the
                      update has samples): True ends the round there as if it were done,
                      with `timed_out` set and the samples seen so far (train.max_local_seconds).
    """

    aux_loss: Callable[[], dict[str, torch.Tensor]] = _no_aux
    should_stop: Callable[[int], bool] | None = None
    progress: Callable[[int, dict], None] | None = None
    out_of_time: Callable[[int], bool] | None = None


@dataclass
class TrainProgress:
    """Where an interrupted local round stands: enough to continue it bitwise. The
    checkpoint stores exactly this (checkpoint.store writes and reads it)."""

    step: int  # optimisation steps already taken
    samples: int
    sums: dict[str, float]  # running loss sums (for the round's mean losses)
    optimizer: dict[str, torch.Tensor]  # flattened AdamW state, see optimizer_state()
    torch_rng: torch.Tensor  # torch's CPU RNG state (LoRA dropout) at the stop
    skipped: int = 0  # unreadable samples left out so far (data.on_bad_sample=skip)

    @classmethod
    def restart(cls, torch_rng: torch.Tensor) -> "TrainProgress":
        """'Restart this round from its start' (an engine that cannot resume mid-round)."""
        return cls(step=0, samples=0, sums={}, optimizer={}, torch_rng=torch_rng)


@dataclass
class ClientGroup:
    """The processes that train one client together (data parallel, deepspeed engine only).

    share(value) is collective over the group: every member calls it and gets the
    leader's (rank 0's) value back, a broadcast. It carries the rendezvous address of
    the group's torch.distributed world once per process. For size 1 it is the identity.
    """

    rank: int  # this process's index inside the group; 0 is the leader
    size: int  # ranks of this client
    share: Callable[[object], object] = lambda value: value

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"ClientGroup: rank {self.rank} must lie in [0, size={self.size})")


SOLO = ClientGroup(rank=0, size=1)  # one process per client


@dataclass
class TrainResult:
    steps: int = 0
    samples: int = 0
    losses: dict[str, float] = field(default_factory=dict)  # means over the steps
    seconds: float = 0.0
    finite: bool = True  # False: a loss went NaN/Inf and training stopped there
    stopped: TrainProgress | None = None  # set when should_stop() interrupted the run
    skipped: int = 0  # unreadable samples left out of their batches (data.on_bad_sample=skip)
    # data.on_bad_sample=fail: the unreadable sample the round stopped at (stopped is set)
    bad_sample: str | None = None
    timed_out: bool = False  # hooks.out_of_time ended the round early (a finished round, shorter)


# Warnings per local round about skipped samples; the rest are counted, and summed up at
# the round's end (a folder of broken images would otherwise print one line per draw).
MAX_SKIP_WARNINGS = 5


class StepLog:
    """The bookkeeping of one run that both engines share: loss sums, steps, samples."""

    def __init__(self, resume: TrainProgress | None = None):
        self.result = TrainResult()
        self.sums: dict[str, float] = {}
        if resume is not None:
            self.sums = dict(resume.sums)
            self.result.steps, self.result.samples = resume.step, resume.samples
            self.result.skipped = resume.skipped
        self.t0 = time.perf_counter()
        self.warned = 0

    def readable(self, mbs: list[dict], policy: str) -> list[dict] | None:
        """A step's micro-batches without their unreadable samples (collate_train's
        "unreadable" lists). policy skip: each one is counted (and the first few named in
        a warning); micro-batches left empty drop out. policy fail: None, with
        result.bad_sample the first one's message."""
        out = []
        for b in mbs:
            messages = b.pop("unreadable", [])
            if messages and policy == "fail":
                self.result.bad_sample = messages[0]
                return None
            for message in messages:
                self.result.skipped += 1
                if self.warned < MAX_SKIP_WARNINGS:
                    self.warned += 1
                    _log.warning("skipped an unreadable sample (data.on_bad_sample=skip): %s", message)
            if "input_ids" in b:
                out.append(b)
        return out

    def record(self, terms: dict[str, torch.Tensor], samples: int, hooks: Hooks) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.result.steps += 1
        self.result.samples += samples
        if hooks.progress is not None:
            hooks.progress(self.result.steps, terms)

    def finish(self) -> TrainResult:
        r = self.result
        r.losses = {k: v / max(r.steps, 1) for k, v in self.sums.items()}
        r.seconds = time.perf_counter() - self.t0
        if r.skipped > self.warned:
            _log.warning("skipped %d unreadable sample(s) in this round (%d named above)", r.skipped, self.warned)
        return r


def batches(n: int, batch_size: int, epochs: int, max_steps: int, gen: torch.Generator):
    """Index batches over `epochs` shuffled passes, cut at max_steps (if > 0)."""
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for s in range(0, n, batch_size):
            if max_steps and steps >= max_steps:
                return
            yield order[s:s + batch_size]
            steps += 1


def micro_batches(idx: list[int], accum: int) -> list[list[int]]:
    """A batch's micro-batches: `accum` contiguous slices, equal for a full batch; a short
    last batch splits into slices that differ by at most one sample (none is empty: with
    fewer samples than accum, fewer micro-batches)."""
    k = min(accum, len(idx))
    return [idx[r * len(idx) // k:(r + 1) * len(idx) // k] for r in range(k)]


def weighted_terms(terms: dict[str, torch.Tensor], tokens: float, all_tokens: float, samples: int,
                   all_samples: int, members: int = 1) -> dict[str, torch.Tensor]:
    """A part's loss terms weighted by its share of the whole batch, so that the parts'
    gradients sum (over micro-batches) or average (over the `members` of a client group,
    whose gradients DeepSpeed averages) to the gradient of the whole batch's loss.

    The ce is a token mean: the part's, over its `tokens` answer tokens, counts
    members x tokens / all_tokens. Every other term is a per-sample mean (L_d, L_z,
    FedProx's term; stage 2's load balance, approximately): members x samples /
    all_samples. Both engines weight through this one rule."""
    return {k: v * ((members * tokens / all_tokens) if k == "ce" else (members * samples / all_samples))
            for k, v in terms.items()}


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter tensors as a flat name -> tensor dict (HDF5-friendly)."""
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            out[f"{idx}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def load_optimizer_state(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in flat.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value.clone()
    sd["state"] = state
    opt.load_state_dict(sd)


def warn_non_finite(step: int, terms: dict[str, torch.Tensor]) -> None:
    """Both engines stop a client's round at a NaN/Inf loss and say so with its terms."""
    _log.warning(
        "non-finite loss at step %d (%s): stopping this client's round", step,
        ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items()))
