"""Local training and evaluation of one client (and the base model's warm start).

The batch order and dropout come from a generator seeded by (run seed, client,
round), so a client trains the same way on whichever rank hosts it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pilot_hpc.data.records import InstructionDataset, collate_prompts, collate_train
from pilot_hpc import evaluate

log = logging.getLogger("pilot_hpc.train")


def seed_for(run_seed: int, client: int, round_: int) -> int:
    return (run_seed * 1_000_003 + client * 10_007 + round_ * 101) % (2 ** 31)


@dataclass
class TrainProgress:
    """Where an interrupted local training stands: enough to continue it bitwise."""

    step: int  # optimisation steps already taken
    samples: int
    sums: dict[str, float]  # running loss sums (for the round's mean losses)
    optimizer: dict[str, torch.Tensor]  # flattened AdamW state, see optimizer_state()
    torch_rng: torch.Tensor  # torch's CPU RNG state (LoRA dropout) at the stop


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


def train_steps(model: torch.nn.Module, dataset: InstructionDataset, params: list[torch.nn.Parameter], *,
                lr: float, batch_size: int, epochs: int, max_steps: int, seed: int, pad_id: int,
                aux_loss: Callable[[], dict[str, torch.Tensor]] = dict, grad_clip: float = 1.0,
                weight_decay: float = 0.0, device: torch.device = torch.device("cpu"),
                progress: Callable[[int, dict], None] | None = None,
                resume: TrainProgress | None = None,
                should_stop: Callable[[int], bool] | None = None,
                engine: str = "torch", group: ClientGroup | None = None, zero_stage: int = 2,
                offload_optimizer: bool = False) -> TrainResult:
    """AdamW over `params` (fresh each round: the optimiser state does not cross rounds).

    aux_loss returns the weighted auxiliary terms of the last forward, added to the
    cross-entropy on answer tokens. should_stop(step) is asked before every step; when
    it says yes the run returns with `stopped` set, and passing that back as `resume`
    continues exactly where it stopped (same batches, dropout and optimiser state).

    engine="deepspeed" trains through a DeepSpeed engine instead (pilot_hpc.engine:
    ZeRO `zero_stage`, optional optimizer offload, data parallel over `group`), with the
    same batches and losses. Its `stopped` always has step 0: it means "restart this
    client's round from its start" (the caller restores the round-start parameters).
    """
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    if engine == "deepspeed":
        from pilot_hpc.engine import train_steps_deepspeed  # the only deepspeed importer

        return train_steps_deepspeed(model, dataset, params, lr=lr, batch_size=batch_size, epochs=epochs,
                                     max_steps=max_steps, seed=seed, pad_id=pad_id, aux_loss=aux_loss,
                                     grad_clip=grad_clip, weight_decay=weight_decay, device=device,
                                     progress=progress, resume=resume, should_stop=should_stop,
                                     group=group or SOLO, zero_stage=zero_stage,
                                     offload_optimizer=offload_optimizer)
    if engine != "torch":
        raise ValueError(f"train engine must be torch or deepspeed, got {engine!r}")
    if group is not None and group.size > 1:
        raise ValueError(f"a client group of {group.size} ranks trains data-parallel only with engine=deepspeed")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout in LoRA
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    sums: dict[str, float] = {}
    result = TrainResult()
    if resume is not None:
        load_optimizer_state(opt, resume.optimizer)
        torch.set_rng_state(resume.torch_rng)
        sums = dict(resume.sums)
        result.steps, result.samples = resume.step, resume.samples
    t0 = time.perf_counter()
    for i, idx in enumerate(batches(len(dataset), batch_size, epochs, max_steps, gen)):
        if i < result.steps:  # replay the data order up to where the run stopped
            continue
        if should_stop is not None and should_stop(i):
            result.stopped = TrainProgress(step=i, samples=result.samples, sums=dict(sums),
                                           optimizer=optimizer_state(opt), torch_rng=torch.get_rng_state())
            break
        batch = collate_train([dataset[j] for j in idx], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        terms = {"ce": out.loss, **aux_loss()}
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            log.warning("non-finite loss at step %d (%s): stopping this client's round", i,
                        ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
            result.finite = False
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        record_step(result, sums, terms, len(idx), progress)
    finish_result(result, sums, t0)
    model.eval()
    return result


def record_step(result: TrainResult, sums: dict[str, float], terms: dict[str, torch.Tensor], samples: int,
                progress: Callable[[int, dict], None] | None) -> None:
    """Bookkeeping after one optimisation step (both engines)."""
    for k, v in terms.items():
        sums[k] = sums.get(k, 0.0) + float(v.detach())
    result.steps += 1
    result.samples += samples
    if progress is not None:
        progress(result.steps, terms)


def finish_result(result: TrainResult, sums: dict[str, float], t0: float) -> None:
    result.losses = {k: v / max(result.steps, 1) for k, v in sums.items()}
    result.seconds = time.perf_counter() - t0


def local_steps(n: int, batch_size: int, epochs: int, max_steps: int) -> int:
    steps = epochs * math.ceil(n / batch_size)
    return min(steps, max_steps) if max_steps else steps


@torch.no_grad()
def generate_answers(model, tokenizer, dataset: InstructionDataset, batch_size: int, max_new_tokens: int,
                     device: torch.device) -> list[str]:
    """Greedy generation of the first answer of every sample; only the new tokens are decoded."""
    model.eval()
    answers: list[str] = []
    for s in range(0, len(dataset), batch_size):
        idx = range(s, min(s + batch_size, len(dataset)))
        batch = collate_prompts([dataset.encode_prompt(i) for i in idx], [dataset.pixels(i) for i in idx],
                                tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def evaluate_client(model, tokenizer, dataset: InstructionDataset, metric: str, batch_size: int,
                    max_new_tokens: int, device: torch.device) -> tuple[float, list[str]]:
    predictions = generate_answers(model, tokenizer, dataset, batch_size, max_new_tokens, device)
    if metric in evaluate.MULTI_REFERENCE:
        references = [dataset.references(i) for i in range(len(dataset))]
    else:
        references = [dataset.answer(i) for i in range(len(dataset))]
    return evaluate.score(metric, predictions, references), predictions
