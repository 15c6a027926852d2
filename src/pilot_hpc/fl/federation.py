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

import dataclasses
import logging
import os
import time

import numpy as np
import torch

from pilot_hpc import faults
from pilot_hpc.checkpoint import candidates, resume
from pilot_hpc.config import Config
from pilot_hpc.errors import CheckpointError
from pilot_hpc.fl.client import ClientSlot, Status, hosting
from pilot_hpc.fl import participation, privacy, stack
from pilot_hpc.fl.coded import install_rows, log_suffix, round_entry
from pilot_hpc.fl.comm import Comm, block_ranges
from pilot_hpc.fl.flat import flatten, to_wire
from pilot_hpc.fl.installs import Installs
from pilot_hpc.fl.stops import BadSampleStop, NoFiniteUpdate, Preempted
from pilot_hpc.fl.stream import Exchange
from pilot_hpc.fl.strategies import Strategy
from pilot_hpc.fl.transforms import Chain
from pilot_hpc.fl.update import Part, Participation, build_update, part_params, part_widths
from pilot_hpc.metrics.generation import evaluate_client, prediction_rows, write_predictions
from pilot_hpc.metrics.scores import mc_unparsed
from pilot_hpc.metrics.subsets import eval_view, subset_values
from pilot_hpc.model.build import PilotModel
from pilot_hpc.progress import EvalProgressLog, TrainProgressLog, steps_after, tokens_per_sample
from pilot_hpc.train.engines import train_steps
from pilot_hpc.train.spec import ClientGroup, Hooks, TrainSpec, lr_field, seed_for

log = logging.getLogger("pilot_hpc.fl")

# Per-client numbers gathered after each evaluation: metric, then mean losses.
# bad_samples: the unreadable samples its round left out (data.on_bad_sample=skip).
# participation: the Participation code of the round (-1: round 0, no training).
STAT_KEYS = ("metric", "ce", "diff", "balance", "z", "prox", "steps", "bad_samples", "participation")
LOSS_KEYS = STAT_KEYS[1:-3]
# Per-step numbers each client keeps during its local round (for TensorBoard, run.tensorboard),
# gathered by the leader with the round's statistics: step, its loss terms, its seconds.
TRACE_KEYS = ("step", "ce", "diff", "balance", "z", "prox", "seconds")


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
        self.policy, self.aggregator = strategy.policy, strategy.aggregator
        # Set by main (None: a strategy that exchanges nothing).
        self.exchanger: Exchange | None = None
        self.transforms = Chain([])
        self.slots = slots
        self.device = device
        self.num_clients = cfg.fl.num_clients
        self.blocks = block_ranges(self.num_clients, self.world.size // cfg.run.ranks_per_client)
        self.t_start = time.perf_counter()
        self.client_group = ClientGroup(rank=0, size=1, share=lambda value: value)
        if group is not None:
            self.client_group = ClientGroup(rank=group.rank, size=group.size, share=group.bcast_object)
        # Rank 0's TensorBoard writer (pilot_hpc.tensorboard.Board), set by main; None: no logging.
        self.board = None
        self.traces: dict[int, np.ndarray] = {}  # this round's per-step traces on rank 0 (gather_traces)
        self.exchange_stats: tuple[int, float] | None = None  # this round's exchange bytes and seconds
        # data.on_bad_sample=fail: the unreadable sample a client of this rank stopped at
        self.bad_sample: str | None = None
        self.installs = Installs(cfg, self.policy, self.aggregator)  # sitting-out clients install when next hosted
        for slot in slots if self.installs.active else ():
            slot.installs = self.installs
        self.last_complete: str | None = None  # this run's newest complete checkpoint (Federation.checkpoint)
        self.clip = cfg.privacy.clip_norm  # the round's privacy clip (adaptive: privacy.share_clip)

    # ------------------------------------------------------------------ the run
    def run(self, start: resume.ResumePoint | None = None) -> list[dict]:
        """Returns (on rank 0) the per-round history: [{"round": r, "clients": [...]}, ...].

        `start` continues from a checkpoint: after a complete round, or inside an
        interrupted one (its clients' status, progress and losses restored).
        With client groups (run.ranks_per_client > 1) every rank trains; only the
        leaders exchange, evaluate and checkpoint, then hand the result to their group.
        """
        history = list(start.history) if start is not None else []
        if start is None:
            self.init_server()
            t0 = time.perf_counter()
            self.record_round(history, 0, 0, self.evaluate(stage=0, round_=0), t0)
            first = 1
        else:
            first = start.round + 1 if start.complete else start.round
        for round_ in range(first, self.cfg.fl.rounds + 1):
            budget = privacy.over_budget(self.cfg, round_)
            if budget is not None:  # every rank reaches the same verdict from the config alone
                if self.world.rank == 0:
                    log.warning("%s", budget)
                break
            self.clip = privacy.share_clip(self.cfg, self.world, history, self.transforms, self.aggregator)
            t0 = time.perf_counter()
            stage = self.policy.stage(round_)
            stopped = self.train_clients(round_, stage)
            stop, finite = self.stop_vote(stopped, round_)
            if stop:
                path = self.checkpoint(round_, complete=False, history=history)
                if self.world.any(self.bad_sample is not None, tag="bad_sample"):
                    raise BadSampleStop(path, self.bad_sample)
                raise Preempted(path)
            if not finite:
                raise self.no_finite_update(round_, stage)
            self.exchange(round_)
            self.sync_group()
            rows = self.evaluate(stage, round_=round_)
            if rows is not None:
                entry = privacy.round_fields(self.cfg, round_, rows, self.clip)
                chosen = self.aggregator.round_record() if self.aggregator is not None else {}
                history.append({"round": round_, "clients": rows, **entry, **round_entry(self.exchanger), **chosen})
            self.checkpoint(round_, complete=True, history=history)
            if rows is not None:
                self.log_round(round_, stage, rows, time.perf_counter() - t0)
        return history

    def init_server(self) -> None:
        """Rank 0, before round 1: the aggregator's common initial update, rank 0's first
        client's (every client starts from the same state). Nothing without an aggregator."""
        if self.aggregator is not None and self.leader and self.comm.rank == 0 and self.slots:
            with hosting(self.pm, self.slots[0]):
                self.aggregator.init_server({part: flatten(params)
                                             for part, params in part_params(self.policy, self.pm).items()})

    def record_round(self, history: list, round_: int, stage: int, rows: list[dict] | None, t0: float) -> None:
        if rows is not None:
            history.append({"round": round_, "clients": rows,
                            **privacy.round_fields(self.cfg, round_, rows, self.clip)})
            self.log_round(round_, stage, rows, time.perf_counter() - t0)

    # ------------------------------------------------------------------ local training
    def aux_terms(self) -> dict[str, torch.Tensor]:
        aux = self.pm.aux()
        t = self.cfg.train
        weights = {"diff": t.lambda_diff, "balance": t.lambda_balance, "z": t.lambda_z}
        return {**{k: weights[k] * v for k, v in aux.items()}, **self.policy.extra_loss(self.pm)}

    def should_stop(self, round_: int, step: int) -> bool:
        faults.maybe_signal(self.world.rank, round_, step)
        return self.world.stop_requested()

    def train_clients(self, round_: int, stage: int) -> bool:
        """Local training of this rank's clients on the datasets the strategy names; True
        when a stop request interrupted it."""
        stopped = False
        selected = self.selected(round_)
        # A client the aggregator left out of this round trains nothing and keeps its state.
        jobs = [(slot, data) for slot, data in self.policy.local_jobs(self.slots) if bool(selected[slot.k])]
        for slot, dataset in jobs:
            if slot.status is Status.DONE:  # finished before an interruption of this round
                continue
            if self.world.stop_requested() or self.bad_sample is not None:
                stopped = True
                continue  # stays pending (or partial)
            try:
                stopped |= self.train_one(slot, dataset, round_, stage, jobs)
            except Exception as err:
                if not participation.should_drop(self.cfg, err):
                    raise
                self.drop(slot, round_, err)
        if not stopped:
            self.policy.after_local(self.slots)
        return stopped

    def train_one(self, slot: ClientSlot, dataset, round_: int, stage: int, jobs: list = ()) -> bool:
        """One client's local training on `dataset`; True when a stop request interrupted it.
        jobs: this rank's (client, dataset) jobs of the round (the rank's ETA counts the later ones)."""
        with hosting(self.pm, slot):
            resume_from = slot.start()
            self.policy.begin_round(self.pm, round_, slot.pre_state)
            self.pm.set_stage(stage)
            if faults.hit("raise", client=slot.k, round=round_):
                raise RuntimeError(f"injected failure (PILOT_HPC_INJECT) in client {slot.k}, round {round_}")
            params = [p for p in self.pm.model.parameters() if p.requires_grad]
            spec = TrainSpec.for_round(self.cfg.train, stage=stage, seed=seed_for(self.cfg.run.seed, slot.k, round_),
                                       num_workers=self.cfg.data.num_workers,
                                       on_bad_sample=self.cfg.data.on_bad_sample)
            g = self.client_group.size
            total = spec.steps(len(dataset), g)
            line = TrainProgressLog(round_=round_, client=slot.k, steps=total, n=len(dataset),
                                    batch_size=spec.batch_size * g, every=self.cfg.run.log_every,
                                    lr=lambda step: spec.lr_at(step - 1, total),  # progress counts from 1
                                    later_steps=steps_after(list(jobs), slot, lambda n: spec.steps(n, g)),
                                    tokens_per_sample=tokens_per_sample(dataset), device=self.device,
                                    first_step=resume_from.step if resume_from is not None else 0)
            budget, t0 = self.cfg.train.max_local_seconds, time.perf_counter()
            hooks = Hooks(aux_loss=self.aux_terms, should_stop=lambda step: self.should_stop(round_, step),
                          progress=line,
                          out_of_time=(lambda step: time.perf_counter() - t0 >= budget) if budget > 0 else None)
            hooks = self.traced(slot, hooks)
            res = train_steps(self.pm.model, dataset, params, spec, pad_id=self.pm.tokenizer.pad_token_id,
                              device=self.device, hooks=hooks, resume=resume_from, group=self.client_group)
            if res.stopped is not None:
                slot.interrupt(res.stopped, self.pm.get_state())
                self.bad_sample = res.bad_sample
                return True
            slot.finish(res, self.pm.get_state())
            if res.timed_out:
                log.info("client %d: train.max_local_seconds=%g reached after %d of %d steps in round %d: its update "
                         "counts with the %d samples it saw", slot.k, budget, res.steps, total, round_, res.samples)
            if faults.hit("nan_update", client=slot.k, round=round_):
                with torch.no_grad():
                    for p in self.policy.shared_params(self.pm):
                        p.fill_(float("nan"))
            update = self.policy.shared_params(self.pm) + self.policy.personal_params(self.pm)
            if not (res.finite and all(bool(torch.isfinite(p).all()) for p in update)):
                log.warning("client %d: non-finite update in round %d: excluded from aggregation; the client "
                            "keeps its parameters from the start of the round", slot.k, round_)
                slot.exclude()
        return False

    def drop(self, slot: ClientSlot, round_: int, err: Exception) -> None:
        """fl.on_client_error=exclude: the client's round raised; it leaves this round's
        aggregation (its update travels as zeros, status dropped) at its round-start state."""
        error = f"{type(err).__name__}: {err}"
        log.warning("client %d: %s in round %d: dropped from this round's aggregation (fl.on_client_error=exclude); "
                    "it keeps its parameters from the start of the round", slot.k, error, round_)
        slot.drop(error)
        for p in self.pm.model.parameters():  # no gradient of the failed step reaches the next client
            p.grad = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # an out-of-memory error leaves the allocator's cache full

    def traced(self, slot: ClientSlot, hooks: Hooks) -> Hooks:
        """hooks whose progress callback also appends each step's loss terms and seconds
        to slot.trace (run.tensorboard only; any progress callback already there still runs).
        Members of a client group keep none: their leader's trace is the client's."""
        if not self.cfg.run.tensorboard or not self.leader:
            return hooks
        inner, last = hooks.progress, [time.perf_counter()]
        if slot.trace is None:  # gather_traces clears it after each evaluation
            slot.trace = []

        def progress(step: int, terms: dict) -> None:
            now = time.perf_counter()
            slot.trace.append([step] + [float(terms[k].detach()) if k in terms else float("nan")
                                        for k in TRACE_KEYS[1:-1]] + [now - last[0]])
            last[0] = now
            if inner is not None:
                inner(step, terms)

        return dataclasses.replace(hooks, progress=progress)

    def stop_vote(self, stopped: bool, round_: int) -> tuple[bool, bool]:
        """Everyone meets here after local training: (stop, finite) in one allreduce. stop: one
        stopped rank makes all of them checkpoint and exit. finite: some client, on some
        rank, has a finite update; False (every client excluded) ends the run, whatever the
        strategy (one that exchanges nothing would otherwise carry on as if it had trained)."""
        selected = self.selected(round_)
        stop, finite = self.world.any_each([stopped or self.world.stop_requested(),
                                            any(slot.finite for slot in self.slots if bool(selected[slot.k]))],
                                           tag="stop")
        return stop, finite

    def no_finite_update(self, round_: int, stage: int) -> NoFiniteUpdate:
        """The error of a round whose every client was excluded; the newest checkpoint is
        named on rank 0 (the one that reports it)."""
        newest = None
        if self.world.rank == 0:
            found = candidates(resume.folder_of(self.cfg))
            newest = found[0][0] if found else None
        key = lr_field(stage, self.cfg.train)
        return NoFiniteUpdate(round_, list(range(self.num_clients)), f"train.{key}", getattr(self.cfg.train, key),
                              newest)

    # ------------------------------------------------------------------ exchange
    def selected(self, round_: int) -> torch.Tensor:
        """[K] bool: the round's participants (the aggregator's choice; local training,
        which exchanges nothing, samples by the same rule so that its clients train as
        often as a federated strategy's)."""
        if self.aggregator is None:
            return participation.selected(self.cfg, round_)
        return self.aggregator.select(round_)

    def exchange(self, round_: int) -> None:
        """Each participant's update, encoded -> the exchange (fl/stream.py: streamed Gatherv,
        mix on rank 0's device, Bcast shared, Scatterv personal) -> install. Strategies that
        send nothing (local, centralized) and the members of a client group (their leader
        exchanges) only close the round."""
        if self.aggregator is not None and self.leader:
            self.exchange_updates(round_)
        selected = self.selected(round_)
        for slot in self.slots:
            slot.took_part = participation.status_of(bool(selected[slot.k]), slot.finite, slot.error)
            slot.last_error = slot.error
            slot.next_round()

    def exchange_updates(self, round_: int) -> None:
        comm, pm = self.comm, self.pm
        selected = self.selected(round_)
        sending = [slot for slot in self.slots if bool(selected[slot.k])]
        updates = []
        for slot in sending:
            # A bad or dropped update travels as zeros; its status tells the server to leave it out.
            status = participation.status_of(True, slot.finite, slot.error)
            with hosting(pm, slot):
                # A round cut short by train.max_local_seconds weighs what it saw.
                n = slot.n if slot.seen is None else slot.seen
                update = build_update(self.policy, pm, slot.k, n, status, round_, device=self.device)
                if self.transforms.needs_start:
                    update.start = self.start_rows(slot)
                if self.transforms.codec is not None:  # its error-feedback residual in, the new one out
                    update.residual = slot.residual
                updates.append(self.transforms.encode(update))
                slot.change_norm = update.change_norm
                if self.transforms.codec is not None:
                    slot.residual = update.residual
        widths = part_widths(self.policy, pm)  # parameter shapes: the same whichever client is hosted
        t0, n_traffic = time.perf_counter(), len(comm.traffic)
        self.aggregator.round = round_
        got = self.exchanger.run(self.aggregator, updates, widths, self.transforms.wire_dtype, selected,
                                 decode=self.transforms.decode)
        # This rank's bytes (sent + received) and seconds of the exchange, for TensorBoard.
        self.exchange_stats = (sum(t.sent + t.received for t in comm.traffic[n_traffic:]), time.perf_counter() - t0)
        del updates
        if got.excluded:
            log.warning("round %d: client(s) %s excluded from aggregation (non-finite update%s)", round_, got.excluded,
                        "" if self.cfg.fl.on_client_error == "abort" else ", or dropped after an error")
        log.debug("round %d: exchange and aggregation %.3f s on %s", round_, time.perf_counter() - t0, self.device)
        if got.stacked is not None:  # fl.lora_rank_rule=stack: the exact product into this rank's shared base
            stack.merge(self.aggregator.bases, self.aggregator.spans, got.stacked)
        for i, slot in enumerate(sending):
            if slot.finite:  # a client with a bad update keeps its last good parameters
                with hosting(pm, slot):
                    self.policy.install(pm, *install_rows(self.policy, pm, got, got.personal[i], slot.pre_state,
                                                          slot.state))
                    slot.state = pm.get_state()
        # A client that sat the round out takes what every client receives: the broadcast
        # rows (Pilot: the latest task adapters; a NaN row, a task without participant,
        # keeps its own) and, for a global model, the global personal row (docs/method.md).
        if self.installs.active:  # lazily: fl/installs.py
            return self.installs.after_exchange(round_, got, self.slots, selected)
        for slot in self.slots:
            if not bool(selected[slot.k]):
                with hosting(pm, slot):
                    state = slot.state
                    self.policy.install(pm, *install_rows(self.policy, pm, got, got.global_personal, state, state))
                    self.policy.sat_out(pm, round_)
                    slot.state = pm.get_state()

    def start_rows(self, slot: ClientSlot) -> dict[Part, torch.Tensor]:
        """The hosted client's parts at the round's start (its pre_state), flattened on the
        model's device; the hosted model is back at its trained state afterwards. The sent
        parameters are what the client installed: begin_round never changes them."""
        pm = self.pm
        pm.set_state(slot.pre_state)
        start = {part: flatten(params, device=self.device) for part, params in part_params(self.policy, pm).items()}
        pm.set_state(slot.state)
        return start

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, stage: int, round_: int = 0) -> list[dict] | None:
        """Every client on its own held-out split; the table rows land on rank 0 (None
        elsewhere, and on the members of a client group, whose leader evaluates). Each
        leader writes its clients' per-sample predictions (predictions_path)."""
        if not self.leader:
            return None
        t = self.cfg.train
        subsets = self.cfg.data.eval_subsets
        rows = []
        chosen = participation.evaluated(self.cfg, round_, self.selected(round_) if round_ > 0 else None)
        answered = {}  # fl.eval_reuse: answers_key -> (client, its evaluation) on this rank
        reuse = self.cfg.fl.eval_reuse and len(self.slots) > 1
        for slot in self.slots:
            metric = self.cfg.metric(slot.task)
            if not bool(chosen[slot.k]):  # not evaluated this round: a null value, never a stale one
                rows.append(self.stat_row(slot, float("nan"), round_) + [float("nan")] * len(subsets))
                continue
            data = eval_view(slot.eval, self.cfg.data.eval_interim_samples, final=round_ == self.cfg.fl.rounds)
            # Evaluation changes no client (fl/installs.py), but the last round's: its file holds them installed.
            with hosting(self.pm, slot, persist=round_ >= self.cfg.fl.rounds):
                self.pm.set_stage(stage)
                key = participation.answers_key(self.pm.state_views(), slot.task_id, stage, data.samples) \
                    if reuse else None
                if key is not None and key in answered:
                    owner, ev = answered[key]
                    log.info("client %d: the same model and items as client %d, whose answers it takes", slot.k,
                             owner)
                else:
                    ev = evaluate_client(self.pm.model, self.pm.tokenizer, data, metric,
                                         t.eval_batch_size, t.max_new_tokens, self.device,
                                         EvalProgressLog(client=slot.k, every=self.cfg.run.log_every,
                                                         device=self.device))
                    if key is not None:
                        answered[key] = (slot.k, ev)
            value = ev.value
            model_id = f"pilot_hpc-{self.cfg.fl.strategy}-client{slot.k:02d}-round{round_:03d}"
            write_predictions(self.predictions_path(round_, slot.k), prediction_rows(data, ev, metric, model_id))
            if metric.startswith("mc_accuracy"):
                unparsed = mc_unparsed(ev.predictions, lenient=metric == "mc_accuracy_lenient")
                if unparsed:
                    log.info("client %d: %d of %d answers name no option (scored as wrong)", slot.k, unparsed,
                             len(ev.predictions))
            rows.append(self.stat_row(slot, value, round_) + subset_values(data, ev.items, subsets))
        rows = [row + privacy.norm_column(self.cfg, slot) for row, slot in zip(rows, self.slots)]
        local = np.array(rows, dtype=np.float64).reshape(-1)
        width = len(STAT_KEYS) + len(subsets) + privacy.norm_width(self.cfg)
        got = self.comm.gatherv(local, [len(b) * width for b in self.blocks], tag="metrics", fast=False)
        table = None if got is None else got.reshape(self.num_clients, width)
        errors = {}
        if self.cfg.fl.on_client_error == "exclude":  # the errors that dropped clients, to rank 0
            found = self.comm.world.gather({s.k: s.last_error for s in self.slots if s.last_error}, root=0)
            errors = {k: e for part in (found or []) for k, e in part.items()}
        self.gather_traces(round_, table)
        if table is None:
            return None
        return [{"client": k, "task": self.cfg.fl.client_tasks[k], "metric": self.cfg.metric(self.cfg.fl.client_tasks[k]),
                 # Percent, as in the paper's tables (CIDEr x 100 as well).
                 "value": round(100.0 * float(table[k, 0]), 4),
                 **{key: float(table[k, i]) for i, key in enumerate(STAT_KEYS[1:-1], start=1)},
                 # How it took part in this round (round 0 trains nothing: no key).
                 **participation.row_fields(int(table[k, len(STAT_KEYS) - 1]), errors.get(k)),
                 **({} if bool(chosen[k]) else {"evaluated": False}), **privacy.norm_field(self.cfg, table[k, -1]),
                 **{f"value_{name}": round(100.0 * float(table[k, len(STAT_KEYS) + i]), 4)
                    for i, name in enumerate(subsets)}}
                for k in range(self.num_clients)]

    @staticmethod
    def stat_row(slot: ClientSlot, value: float, round_: int) -> list:
        """A client's STAT_KEYS numbers after `round_`, its evaluated `value` first."""
        took_part = slot.took_part if round_ > 0 else None
        if took_part is Participation.NOT_SELECTED:  # it trained nothing: no losses, not stale ones
            return [value] + [float("nan")] * len(LOSS_KEYS) + [0, 0, took_part.code]
        return [value] + [slot.losses.get(k, float("nan")) for k in LOSS_KEYS] + \
            [slot.steps, slot.skipped, -1 if took_part is None else took_part.code]

    def predictions_path(self, round_: int, k: int) -> str:
        return os.path.join(self.cfg.run.output_dir, "predictions", f"round_{round_:03d}", f"client_{k:02d}.jsonl")

    def gather_traces(self, round_: int, table: np.ndarray | None) -> None:
        """run.tensorboard: every client's per-step trace of this round to rank 0 in one
        gather, kept in self.traces {client: rows}. Each client sends exactly `steps` rows
        (the table's steps column, which rank 0 has just gathered, so it knows the counts):
        steps taken before a restart left no trace and travel as NaN rows. Round 0 trains
        nothing and gathers nothing. The clients' traces are cleared for the next round."""
        self.traces = {}
        if not self.cfg.run.tensorboard or round_ == 0:
            return
        width = len(TRACE_KEYS)
        mine = []
        for slot in self.slots:
            trace = np.asarray(slot.trace or [], dtype=np.float64).reshape(-1, width)
            # A client that sat the round out took no step (its steps are its last round's).
            steps = 0 if slot.took_part is Participation.NOT_SELECTED else int(slot.steps)
            pad = np.full((max(steps - len(trace), 0), width), np.nan)
            mine.append(np.concatenate([pad, trace[len(trace) - min(steps, len(trace)):]]))
            slot.trace = None
        counts = [0] * self.comm.size  # gatherv reads all counts on rank 0 only, its own elsewhere
        counts[self.comm.rank] = sum(m.size for m in mine)
        if table is not None:
            steps_of = table[:, STAT_KEYS.index("steps")].astype(np.int64)
            counts = [int(sum(steps_of[k] for k in b)) * width for b in self.blocks]
        local = np.concatenate([m.reshape(-1) for m in mine]) if mine else np.zeros(0)
        got = self.comm.gatherv(local, counts, tag="trace", fast=False)
        if got is None:
            return
        offset = 0
        for k in range(self.num_clients):
            n = int(steps_of[k]) * width
            self.traces[k] = got[offset:offset + n].reshape(-1, width)
            offset += n

    def log_round(self, round_: int, stage: int, rows: list[dict], seconds: float) -> None:
        by_task: dict[str, list[float]] = {}
        for row in rows:
            if row["value"] == row["value"]:  # NaN: not evaluated this round (fl.eval_every, fl.eval_clients)
                by_task.setdefault(row["task"], []).append(row["value"])
        scores = "  ".join(f"{t} {np.mean(v):.1f}" for t, v in by_task.items())
        losses = "" if round_ == 0 else "  loss " + " ".join(
            f"{k} {np.nanmean([r[k] for r in rows]):.4f}" for k in ("ce", "diff", "balance", "z", "prox")
            if not np.all(np.isnan([r[k] for r in rows])))
        log.info("round %d/%d stage %d | %.1f s (elapsed %.1f s)%s | %s%s", round_, self.cfg.fl.rounds, stage, seconds,
                 time.perf_counter() - self.t_start, losses, scores,
                 participation.log_suffix(rows) + privacy.log_suffix(self.cfg, round_, rows, self.clip)
                 + (log_suffix(self.exchanger) if round_ > 0 else ""))
        skipped = {r["client"]: int(r["bad_samples"]) for r in rows if r.get("bad_samples", 0) > 0}
        if skipped:
            log.warning("round %d: unreadable samples skipped (data.on_bad_sample=skip): %s", round_,
                        ", ".join(f"client {k}: {n}" for k, n in skipped.items()))
        if self.board is not None:
            self.board.log_round(round_, rows, {t: float(np.mean(v)) for t, v in by_task.items()},
                                 self.traces, self.exchange_stats, seconds,
                                 lr=self.scheduled_lr(stage), batch_size=self.cfg.train.batch_size,
                                 codec=round_entry(self.exchanger).get("bytes") if round_ > 0 else None)
            privacy.log_board(self.board, self.cfg, round_, self.clip)
            self.exchange_stats = None

    def scheduled_lr(self, stage: int):
        """lr(step, total) of this stage's rounds: step counted from 1 (as the traces do)
        in a client's round of `total` steps (the schedule restarts every round)."""
        spec = TrainSpec.for_round(self.cfg.train, stage=stage, seed=0)
        return lambda step, total: spec.lr_at(step - 1, total)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, round_: int, *, complete: bool, history: list) -> str:
        """The round's checkpoint (the leaders write it; members of a client group hold
        their leader's states and write nothing): its path, "" on a member."""
        if not self.leader:
            return ""
        linked, link_to = self.installs.linkable(self.slots, self.last_complete if complete else None)
        path = resume.save(self.comm, self.cfg, round_, complete=complete, history=history,
                           server=self.aggregator.server_state() if self.aggregator is not None else {},
                           clients={s.k: s.record(complete) for s in self.slots if s.k not in linked},
                           installs=self.installs.record(), linked=linked, link_to=link_to)
        if complete:
            self.last_complete = path
            for slot in self.slots:
                slot.changed = False
        return path

    def locate(self, expected: dict[str, tuple[int, ...]]) -> resume.ResumePoint | None:
        """The resume point on the leaders, with their clients and the server state restored."""
        if not self.leader:
            return None
        start = resume.locate(self.comm, self.cfg, expected, [s.k for s in self.slots])
        if start is not None:
            for slot in self.slots:
                slot.restore(start.clients[slot.k], start.complete)
            if self.installs.active:
                self.installs.restore(start.installs, self.slots, {k: c.installed for k, c in start.clients.items()})
            if self.aggregator is not None:
                self.aggregator.load_server_state(start.server)
            elif start.server:
                raise CheckpointError(f"strategy {self.strategy.name!r} keeps no server state, but the checkpoint has "
                                 f"{sorted(start.server)}")
        return start

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
        head = np.array([-1, 0] if start is None else [start.round, int(start.complete)], dtype=np.int64)
        self.group.bcast(head, tag="group_start")
        if head[0] < 0:
            return None
        status = np.array([s.status.code for s in self.slots], dtype=np.int64)
        self.group.bcast(status, tag="group_start")
        for slot, code in zip(self.slots, status):
            slot.state = self._bcast_state(slot.state)
            slot.status = Status.from_code(code)
            # An engine stop restarts the client's round (TrainProgress step 0), so a
            # partial client's round-start state is the state it holds.
            slot.pre_state = slot.state if slot.status is Status.PARTIAL else None
            slot.progress = None
        if self.leader:
            return start
        return resume.ResumePoint(path="", round=int(head[0]), complete=bool(head[1]), history=[])
