"""Which clients take part in a round (fl.clients_per_round, fl.sampling), and which are
evaluated after it (fl.eval_every, fl.eval_clients): pure functions
of the run's seed and the round, so every rank, a resumed run and a run on any number of
ranks compute the same set without a message. Also which evaluated clients of a rank
would give the same answers as another (fl.eval_reuse: answers_key).

The draw uses its own generator, numpy's default_rng seeded with (run.seed, round,
SALT): it consumes nothing from torch's or numpy's global streams, so with sampling off
(fl.clients_per_round = 0, the default) nothing is drawn and every number of a run is
what it was before sampling existed.

How many: fl.clients_per_round = 0 means every client; a value in (0, 1) is a fraction
of the K clients, rounded up (ceil(fraction * K), at least 1: "10% of 15 clients" takes
2, never 0); a value >= 1 is a count (an integer, at most K).

Which (fl.sampling):
  uniform     `count` distinct clients drawn uniformly without replacement.
  stratified  by task, so that every task's adapter is aggregated every round when the
              count allows it. With count >= T (tasks), every task first gets one seat;
              each further seat goes to the task with the smallest share of its clients
              seated so far (quota_t / size_t; ties to the lower task id) among those with
              a client left, which splits the count in proportion to the tasks' sizes.
              With count < T, `count` tasks are drawn uniformly and take one client each.
              Within a task the clients are drawn uniformly without replacement.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from pilot_hpc.fl.update import Participation

# The third word of the generator's seed: keeps this stream apart from any other stream a
# future feature seeds with (run.seed, round).
SALT = 0x5A3C1E


def participants_count(clients_per_round: float, num_clients: int) -> int:
    """The number of clients a round takes (see the module docstring for the rounding)."""
    if clients_per_round == 0:
        return num_clients
    if 0 < clients_per_round < 1:
        # The small tolerance keeps 0.3 * 10 (= 3.0000000000000004 in floats) at 3.
        return max(1, math.ceil(clients_per_round * num_clients - 1e-9))
    return int(clients_per_round)


def task_quotas(sizes: list[int], count: int) -> list[int]:
    """Seats per task for `count` >= number of tasks (module docstring: stratified)."""
    quotas = [1] * len(sizes)
    for _ in range(count - len(sizes)):
        open_ = [t for t in range(len(sizes)) if quotas[t] < sizes[t]]
        t = min(open_, key=lambda t: (quotas[t] / sizes[t], t))
        quotas[t] += 1
    return quotas


def select_clients(seed: int, round_: int, tasks: list[int], count: int, rule: str) -> torch.Tensor:
    """[K] bool: the clients of `round_` (tasks: each client's task id)."""
    k = len(tasks)
    mask = torch.zeros(k, dtype=torch.bool)
    if count >= k:
        mask[:] = True
        return mask
    rng = np.random.default_rng([seed, round_, SALT])
    if rule == "uniform":
        chosen = rng.choice(k, size=count, replace=False)
    elif rule == "stratified":
        task_ids = sorted(set(tasks))
        members = [[c for c in range(k) if tasks[c] == t] for t in task_ids]
        if count >= len(task_ids):
            quotas = task_quotas([len(m) for m in members], count)
        else:
            drawn = set(rng.choice(len(task_ids), size=count, replace=False).tolist())
            quotas = [1 if i in drawn else 0 for i in range(len(task_ids))]
        chosen = [c for m, q in zip(members, quotas) if q
                  for c in rng.choice(m, size=q, replace=False).tolist()]
    else:
        raise ValueError(f"unknown sampling rule {rule!r}")
    mask[torch.as_tensor(np.asarray(chosen, dtype=np.int64))] = True
    return mask


def selected(cfg, round_: int) -> torch.Tensor:
    """[K] bool: the participants of `round_` under cfg's fl.clients_per_round and
    fl.sampling (everyone when clients_per_round is 0)."""
    k = cfg.fl.num_clients
    count = participants_count(cfg.fl.clients_per_round, k)
    if count >= k:
        return torch.ones(k, dtype=torch.bool)
    tasks = [cfg.tasks.index(t) for t in cfg.fl.client_tasks]
    return select_clients(cfg.run.seed, round_, tasks, count, cfg.fl.sampling)


def status_of(chosen: bool, finite: bool, error: str | None = None):
    """How a client took part in a round it has finished: not selected, or its update's fate."""
    if not chosen:
        return Participation.NOT_SELECTED
    if error is not None:
        return Participation.DROPPED
    return Participation.PARTICIPATED if finite else Participation.EXCLUDED_NONFINITE


def row_fields(code: int, error: str | None = None) -> dict:
    """The metrics row's participation field from its gathered code (-1: round 0, none),
    and the error that dropped the client, if one did."""
    if code < 0:
        return {}
    return {"participation": Participation.from_code(code).value, **({"error": error} if error else {})}


def should_drop(cfg, err: BaseException) -> bool:
    """fl.on_client_error=exclude and an error a client's round may fail with and the job
    survive: a RuntimeError (CUDA/torch out-of-memory included, a RuntimeError subclass),
    but neither bad input (it would fail every client alike: exit 2 names it) nor a bug in
    the round's bookkeeping (TransitionError)."""
    from pilot_hpc.errors import BadInput
    from pilot_hpc.fl.client import TransitionError

    return (cfg.fl.on_client_error == "exclude" and isinstance(err, RuntimeError)
            and not isinstance(err, (BadInput, TransitionError)))


def log_suffix(rows: list[dict]) -> str:
    """The round line's note of who took part, when not everyone did."""
    took = [r["client"] for r in rows if r.get("participation", "participated") == "participated"]
    if len(took) == len(rows):
        return ""
    return f" | took part: {len(took)}/{len(rows)} clients {took}"


# The fixed evaluation sample's stream: a "round" no run reaches, apart from every round's
# (numpy's seed words are non-negative).
EVAL_ROUND = 2 ** 32 - 1


def evaluated(cfg, round_: int, chosen: torch.Tensor | None) -> torch.Tensor:
    """[K] bool: the clients evaluated after `round_` (fl.eval_every, fl.eval_clients).

    Round 0 (the starting point) and the last round are always evaluated, other rounds
    every eval_every. `participants` evaluates the round's participants (`chosen`), but
    every client in round 0 and in the last round, so the start and the final table are
    complete; `sample` evaluates the same eval_sample clients in every evaluated round,
    drawn once from run.seed, stratified by task (every task's average has a client when
    the sample allows)."""
    k, fl = cfg.fl.num_clients, cfg.fl
    edge = round_ == 0 or round_ >= fl.rounds
    if not edge and round_ % fl.eval_every:
        return torch.zeros(k, dtype=torch.bool)
    if fl.eval_clients == "sample":
        tasks = [cfg.tasks.index(t) for t in fl.client_tasks]
        return select_clients(cfg.run.seed, EVAL_ROUND, tasks, fl.eval_sample, "stratified")
    if fl.eval_clients == "participants" and not edge and chosen is not None:
        return chosen.clone()
    return torch.ones(k, dtype=torch.bool)


def answers_key(state: dict[str, torch.Tensor], task_id: int, stage: int, samples) -> bytes:
    """What a client's evaluation depends on beyond what the clients of a rank share (the
    frozen model, tokenizer, metric settings, batch size and token budget): its personal
    state as hosted, its task and stage, and the items it is asked. Two clients with equal
    keys get the same answers (greedy decoding of the same model over the same batches), so
    under FedAvg-like strategies, whose clients all hold the global model, a rank generates
    once per task. A 160-bit BLAKE2b digest of the bytes themselves, not of their values:
    -0.0 and 0.0 differ, as they may in what the model computes."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"task {task_id} stage {stage}\n".encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(state[name].shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())  # the buffer itself: no copy of a CPU tensor
    for s in samples:
        h.update(repr((s.id, s.image_path, s.turns, s.references, s.subset)).encode())
    return h.digest()
