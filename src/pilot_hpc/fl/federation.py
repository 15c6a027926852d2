"""The federated round loop: clients on ranks, rank 0 also the server.

Each round reads like the paper's algorithm:
  local training (stage 1 in round 1, stage 2 after) on every client of this rank
  -> Gatherv of the flattened updates to rank 0, in chunks (fl/stream.py)
  -> server aggregation on rank 0's device, chunk by chunk (the strategy's mixing plan)
  -> Bcast of the shared part (Pilot: the T task adapters), Scatterv of the personal part
  -> install, evaluate, checkpoint, one progress line.
K clients may exceed the W ranks: a rank then runs its block of clients one after
another on one shared model, swapping their personal state in and out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pilot_hpc import faults
from pilot_hpc.config import Config
from pilot_hpc.data.records import InstructionDataset
from pilot_hpc.fl.comm import Comm, block_ranges
from pilot_hpc.fl.flat import flatten, numel, to_wire
from pilot_hpc.fl.stream import StreamedExchange
from pilot_hpc.fl.strategies import Strategy
from pilot_hpc.model.llava import PilotModel
from pilot_hpc.fl import resume
from pilot_hpc.train import ClientGroup, TrainProgress, evaluate_client, seed_for, train_steps

log = logging.getLogger("pilot_hpc.fl")

# Per-client numbers gathered after each evaluation: metric, then mean losses.
STAT_KEYS = ("metric", "ce", "diff", "balance", "z", "prox", "steps")

# The client this rank is working on, for the failure message of the MPI abort.
current_client: int | None = None


class Preempted(Exception):
    """All ranks agreed to stop (SIGTERM/SIGUSR2): a mid-round checkpoint was written."""

    def __init__(self, path: str):
        super().__init__(f"preempted: checkpoint {path} written; rerun the same command to resume")
        self.path = path


@dataclass
class ClientSlot:
    k: int
    task: str
    task_id: int
    train: InstructionDataset
    eval: InstructionDataset
    state: dict[str, torch.Tensor]
    losses: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    # Within a round: pending -> (partial ->) done. pre_state is the state at the
    # round's start: the "last good" parameters a bad update falls back to.
    status: str = "pending"
    pre_state: dict[str, torch.Tensor] | None = None
    progress: TrainProgress | None = None
    finite: bool = True

    @property
    def n(self) -> int:
        return len(self.train)


class PooledDataset(torch.utils.data.Dataset):
    """The union of several clients' training sets (for centralized training)."""

    def __init__(self, parts: list[InstructionDataset]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[part][i - int(self.offsets[part])]


class Federation:
    def __init__(self, cfg: Config, comm: Comm | None, pm: PilotModel, strategy: Strategy, slots: list[ClientSlot],
                 device: torch.device, world: Comm | None = None, group: Comm | None = None):
        """comm: the federation's ranks (one per client host; None on a rank that is not
        its client group's leader); world: every rank (stop requests and the stop vote);
        group: this rank's client group when run.ranks_per_client > 1."""
        self.cfg = cfg
        self.comm = comm
        self.world = world if world is not None else comm
        self.group = group
        self.leader = group is None or group.rank == 0
        self.pm = pm
        self.strategy = strategy
        self.slots = slots
        self.device = device
        self.num_clients = cfg.fl.num_clients
        self.num_tasks = len(cfg.tasks)
        self.blocks = block_ranges(self.num_clients, self.world.size // cfg.run.ranks_per_client)
        self.t_start = time.perf_counter()
        self.client_group = ClientGroup(rank=0, size=1, share=lambda value: value)
        if group is not None:
            self.client_group = ClientGroup(rank=group.rank, size=group.size, share=group.bcast_object)

    # ------------------------------------------------------------------ helpers
    def activate(self, slot: ClientSlot) -> None:
        global current_client
        current_client = slot.k
        self.pm.connector.own_task = slot.task_id
        self.pm.set_state(slot.state)

    def aux_terms(self) -> dict[str, torch.Tensor]:
        aux = self.pm.connector.aux
        t = self.cfg.train
        weights = {"diff": t.lambda_diff, "balance": t.lambda_balance, "z": t.lambda_z}
        return {**{k: weights[k] * v for k, v in aux.items()}, **self.strategy.extra_loss(self.pm)}

    # ------------------------------------------------------------------ one round
    def should_stop(self, round_: int, step: int) -> bool:
        faults.maybe_signal(self.world.rank, round_, step)
        return self.world.stop_requested()

    def train_clients(self, round_: int, stage: int) -> bool:
        """Local training of this rank's clients; True when a stop request interrupted it."""
        if self.strategy.pooled:
            return self.train_pooled(round_, stage)
        stopped = False
        for slot in self.slots:
            if slot.status == "done":  # finished before an interruption of this round
                continue
            if self.world.stop_requested():
                stopped = True
                continue  # stays pending (or partial)
            stopped |= self.train_one(slot, slot.train, round_, stage)
        return stopped

    def train_pooled(self, round_: int, stage: int) -> bool:
        """Centralized: one model (kept in the first client's slot) trains on the union of
        every client's data; then every client holds that model (W = 1)."""
        lead = self.slots[0]
        if lead.status != "done":
            if self.world.stop_requested() or self.train_one(lead, PooledDataset([s.train for s in self.slots]),
                                                            round_, stage):
                return True
        for slot in self.slots[1:]:
            slot.state, slot.losses, slot.steps, slot.status = lead.state, lead.losses, lead.steps, "done"
        return False

    def train_one(self, slot: ClientSlot, dataset, round_: int, stage: int) -> bool:
        """One client's local training on `dataset`; True when a stop request interrupted it."""
        t = self.cfg.train
        self.activate(slot)
        if slot.status == "pending":
            slot.pre_state = slot.state
        self.strategy.begin_round(self.pm, round_, slot.pre_state)
        self.pm.set_stage(stage)
        if faults.hit("raise", client=slot.k, round=round_):
            raise RuntimeError(f"injected failure (PILOT_HPC_INJECT) in client {slot.k}, round {round_}")
        params = [p for p in self.pm.model.parameters() if p.requires_grad]
        lr = t.lr_stage1 if stage == 1 else t.lr_stage2
        res = train_steps(self.pm.model, dataset, params, lr=lr, batch_size=t.batch_size,
                          epochs=t.local_epochs, max_steps=t.max_steps,
                          seed=seed_for(self.cfg.run.seed, slot.k, round_), pad_id=self.pm.tokenizer.pad_token_id,
                          aux_loss=self.aux_terms, grad_clip=t.grad_clip, weight_decay=t.weight_decay,
                          device=self.device, resume=slot.progress,
                          should_stop=lambda step: self.should_stop(round_, step),
                          engine=t.engine, group=self.client_group, zero_stage=t.zero_stage,
                          offload_optimizer=t.offload_optimizer)
        if res.stopped is not None:
            # step 0: the engine restarts this client's round from its start (DeepSpeed
            # keeps no resumable optimizer state), so keep the round-start parameters.
            slot.state = slot.pre_state if res.stopped.step == 0 else self.pm.get_state()
            slot.status, slot.progress = "partial", res.stopped
            return True
        slot.state = self.pm.get_state()
        slot.status, slot.progress = "done", None
        slot.losses, slot.steps = res.losses, res.steps
        if faults.hit("nan_update", client=slot.k, round=round_):
            with torch.no_grad():
                for p in self.strategy.visual_params(self.pm):
                    p.fill_(float("nan"))
        update = self.strategy.visual_params(self.pm) + self.strategy.text_params(self.pm)
        slot.finite = res.finite and all(bool(torch.isfinite(p).all()) for p in update)
        if not slot.finite:
            log.warning("client %d: non-finite update in round %d: excluded from aggregation; the client "
                        "keeps its parameters from the start of the round", slot.k, round_)
            slot.state = slot.pre_state
        return False

    def exchange(self, round_: int) -> None:
        """Streamed Gatherv of the updates -> mix on rank 0's device -> Bcast shared,
        Scatterv personal (fl/stream.py) -> install."""
        comm, pm, strat = self.comm, self.pm, self.strategy
        dtype = next(pm.model.parameters()).dtype
        p_vis, p_txt = numel(strat.visual_params(pm)), numel(strat.text_params(pm))
        # [n_local, Pv + Pt] on the model's device; a bad update travels as zeros and
        # its good flag tells the server to leave it out.
        local = torch.zeros(len(self.slots), p_vis + p_txt, dtype=dtype, device=self.device)
        for i, slot in enumerate(self.slots):
            if slot.finite:
                self.activate(slot)
                local[i] = flatten(strat.visual_params(pm) + strat.text_params(pm), device=self.device).to(dtype)
        meta = np.array([[s.n, int(s.finite)] for s in self.slots], dtype=np.int64).reshape(-1, 2)
        tasks = torch.tensor([self.cfg.tasks.index(t) for t in self.cfg.fl.client_tasks])
        t0 = time.perf_counter()
        got = StreamedExchange(comm, self.blocks, self.device, self.cfg.fl.chunk_mb).run(
            strat, local, meta, p_vis, tasks, self.num_tasks)
        del local
        if got.excluded:
            log.warning("round %d: client(s) %s excluded from aggregation (non-finite update)", round_, got.excluded)
        log.debug("round %d: exchange and aggregation %.3f s on %s", round_, time.perf_counter() - t0, self.device)
        for i, slot in enumerate(self.slots):
            if slot.finite:  # a client with a bad update keeps its last good parameters
                self.activate(slot)
                strat.install(pm, got.shared, got.personal[i], round_)
                slot.state = pm.get_state()
            slot.status, slot.pre_state, slot.progress, slot.finite = "pending", None, None, True

    def keep_local(self, round_: int) -> None:
        for slot in self.slots:
            slot.status, slot.pre_state, slot.progress, slot.finite = "pending", None, None, True

    def evaluate(self, stage: int) -> list[dict] | None:
        """Every client on its own held-out split; the table rows land on rank 0."""
        t = self.cfg.train
        rows = []
        for slot in self.slots:
            self.activate(slot)
            self.pm.set_stage(stage)
            value, _ = evaluate_client(self.pm.model, self.pm.tokenizer, slot.eval, self.cfg.metric(slot.task),
                                       t.eval_batch_size, t.max_new_tokens, self.device)
            rows.append([value] + [slot.losses.get(k, float("nan")) for k in STAT_KEYS[1:-1]] + [slot.steps])
        local = np.array(rows, dtype=np.float64).reshape(-1)
        width = len(STAT_KEYS)
        got = self.comm.gatherv(local, [len(b) * width for b in self.blocks], tag="metrics", fast=False)
        if got is None:
            return None
        table = got.reshape(self.num_clients, width)
        return [{"client": k, "task": self.cfg.fl.client_tasks[k], "metric": self.cfg.metric(self.cfg.fl.client_tasks[k]),
                 # Percent, as in the paper's tables (CIDEr x 100 as well).
                 "value": round(100.0 * float(table[k, 0]), 4),
                 **{key: float(table[k, i]) for i, key in enumerate(STAT_KEYS[1:], start=1)}}
                for k in range(self.num_clients)]

    # ------------------------------------------------------------------ the run
    def log_round(self, round_: int, stage: int, rows: list[dict], seconds: float) -> None:
        by_task: dict[str, list[float]] = {}
        for row in rows:
            by_task.setdefault(row["task"], []).append(row["value"])
        scores = "  ".join(f"{t} {np.mean(v):.1f}" for t, v in by_task.items())
        losses = "" if round_ == 0 else "  loss " + " ".join(
            f"{k} {np.nanmean([r[k] for r in rows]):.4f}" for k in ("ce", "diff", "balance", "z", "prox")
            if not np.all(np.isnan([r[k] for r in rows])))
        log.info("round %d/%d stage %d | %.1f s (elapsed %.1f s)%s | %s", round_, self.cfg.fl.rounds, stage, seconds,
                 time.perf_counter() - self.t_start, losses, scores)

    def run(self, start: resume.ResumePoint | None = None) -> list[dict]:
        """Returns (on rank 0) the per-round history: [{"round": r, "clients": [...]}, ...].

        `start` continues from a checkpoint: after a complete round, or inside an
        interrupted one (its clients' status, progress and losses restored).
        With client groups (run.ranks_per_client > 1) every rank trains; only the
        leaders exchange, evaluate and checkpoint, then hand the result to their group.
        """
        history = list(start.history) if start is not None else []
        if start is None and self.leader and self.comm.rank == 0 and self.slots:
            # Every client starts from the same initial state: rank 0's first client's.
            self.activate(self.slots[0])
            self.strategy.init_server(flatten(self.strategy.visual_params(self.pm)),
                                      flatten(self.strategy.text_params(self.pm)))
        if start is None:
            t0 = time.perf_counter()
            rows = self.evaluate(stage=0) if self.leader else None
            if rows is not None:
                history.append({"round": 0, "clients": rows})
                self.log_round(0, 0, rows, time.perf_counter() - t0)
            first = 1
        else:
            first = start.round + 1 if start.complete else start.round
        for round_ in range(first, self.cfg.fl.rounds + 1):
            t0 = time.perf_counter()
            stage = self.strategy.stage(round_)
            stopped = self.train_clients(round_, stage)
            # Everyone meets here; one stopped rank makes all of them checkpoint and exit.
            if self.world.any(stopped or self.world.stop_requested(), tag="stop"):
                path = resume.save(self, round_, complete=False, history=history) if self.leader else ""
                raise Preempted(path)
            if self.strategy.communicates and self.leader:
                self.exchange(round_)
            else:  # local training (a bad round is undone), or a group member
                self.keep_local(round_)
            self.sync_group()
            rows = self.evaluate(stage) if self.leader else None
            if rows is not None:
                history.append({"round": round_, "clients": rows})
            if self.leader:
                resume.save(self, round_, complete=True, history=history)
            if rows is not None:
                self.log_round(round_, stage, rows, time.perf_counter() - t0)
        return history

    # ------------------------------------------------------------------ client groups
    def _bcast_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One client state from the group leader to its members (fresh tensors: slots may
        share tensors with the initial state)."""
        out = {}
        for key in sorted(state):
            t = state[key].detach().to("cpu", copy=True).contiguous()
            self.group.bcast(to_wire(t.reshape(-1)), tag="group_state")
            out[key] = t
        return out

    def sync_group(self) -> None:
        """After the exchange: every member of a client group takes its leader's states."""
        if self.group is None or self.group.size == 1:
            return
        for slot in self.slots:
            slot.state = self._bcast_state(slot.state)

    def share_start(self, start: resume.ResumePoint | None) -> resume.ResumePoint | None:
        """The leader's resume point, client statuses and states, given to its group."""
        if self.group is None or self.group.size == 1:
            return start
        codes = {"pending": 0, "partial": 1, "done": 2}
        head = np.array([-1, 0] if start is None else [start.round, int(start.complete)], dtype=np.int64)
        self.group.bcast(head, tag="group_start")
        if head[0] < 0:
            return None
        status = np.array([codes[s.status] for s in self.slots], dtype=np.int64)
        self.group.bcast(status, tag="group_start")
        for slot, code in zip(self.slots, status):
            slot.state = self._bcast_state(slot.state)
            slot.status = [k for k, v in codes.items() if v == code][0]
            # An engine stop restarts the client's round (TrainProgress step 0), so a
            # partial client's round-start state is the state it holds.
            slot.pre_state = slot.state if slot.status == "partial" else None
            slot.progress = None
        if self.leader:
            return start
        return resume.ResumePoint(path="", round=int(head[0]), complete=bool(head[1]), history=[])
