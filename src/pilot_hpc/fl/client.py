"""A client as the federation holds it: its data, its personal state, and where it
stands in the current round (a small state machine with named transitions).

    PENDING --start--> (training) --finish--> DONE --next_round--> PENDING
                           |                    |
                       interrupt            exclude (bad update: back to the
                           v                    round-start state, left out)
                        PARTIAL --start--> (training continues) ...

A rank hosts its clients one at a time on one shared model: `hosting(pm, slot)` puts a
client's state into the model and records which client this rank is working on, so
that the failure message of an MPI abort can name it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from pilot_hpc.checkpoint.store import ClientCheckpoint, Status
from pilot_hpc.fl import lora_distance
from pilot_hpc.fl.update import Participation
from pilot_hpc.train.spec import TrainProgress, TrainResult


class TransitionError(RuntimeError):
    """A client asked to move between statuses in a way the round does not allow."""


_hosted: int | None = None  # the client this rank works on (for the abort message)
# The fields ClientSlot.record puts into a checkpoint (their change marks the slot changed).
_RECORDED = frozenset({"state", "pre_state", "residual", "status", "steps", "skipped", "finite", "losses",
                       "progress", "installed"})
_MISSING = object()


def hosted_client() -> int | None:
    return _hosted


def truncate_hosted(pm, ranks: list[int] | None) -> None:
    """Clients of different ranks (config.padded_client_ranks): the hosted client's LoRA
    components beyond its own rank to zero (ranks None: nothing to do). Zeroing is
    idempotent, so a resumed round is unchanged."""
    if ranks is None:
        return
    if _hosted is None:
        raise RuntimeError("model.lora_ranks: a client's LoRA is truncated to its rank inside "
                           "fl.client.hosting(pm, slot), which names the client")
    lora_distance.truncate_(pm.lora_named_parameters(), ranks[_hosted])


@contextlib.contextmanager
def hosting(pm, slot: "ClientSlot", persist: bool = True):
    """Puts slot's personal state (and task) into the shared model for the block's body.

    With lazy installs the rows it lacks are installed too; persist=False (a body that
    only reads the model, as evaluation) keeps them out of the slot, which then stays
    unchanged (fl/installs.py). The record of the hosted client is cleared on a normal
    exit only: when the body raises, the abort handler still finds the client it failed in."""
    global _hosted
    _hosted = slot.k
    pm.set_task(slot.task_id)
    pm.set_state(slot.state)
    if slot.installs is not None:  # the broadcast rows of rounds it sat out (fl/installs.py)
        slot.installs.catch_up(pm, slot, persist)
    yield slot
    slot.release()
    _hosted = None


@dataclass
class ClientSlot:
    k: int
    task: str
    task_id: int
    train: object  # InstructionDataset
    eval: object
    state: dict[str, torch.Tensor]
    losses: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    skipped: int = 0  # unreadable samples its last round left out (data.on_bad_sample=skip)
    status: Status = Status.PENDING
    # The state at the round's start: the "last good" parameters a bad update falls back to.
    pre_state: dict[str, torch.Tensor] | None = None
    progress: TrainProgress | None = None  # PARTIAL: where its training stands
    finite: bool = True
    # This round's per-step loss rows (run.tensorboard; Federation.traced / gather_traces).
    trace: list | None = None
    # How the client took part in the round just closed (Federation.exchange sets it before
    # next_round clears the round's flags; the evaluation's metrics rows report it).
    took_part: Participation | None = None
    # train.max_local_seconds cut its round short: the samples it saw (its update's weight).
    seen: int | None = None
    # fl.on_client_error=exclude: the error that dropped it from this round ("Type: message"),
    # and the one of the round just closed (the metrics row's "error").
    error: str | None = None
    last_error: str | None = None
    # A lossy fl.codec: its error-feedback residual per part name (fl/coded.py), kept across
    # rounds and in the checkpoint; None until its first encoded update.
    residual: dict[str, torch.Tensor] | None = None
    # The last round whose server answer it holds (fl/installs.py; lazy installs only).
    installed: int = 0
    # privacy.where != none: the pre-clip norm of the change it sent in its last round
    # (the metrics row's change_norm; fl/privacy.py:norm_column).
    change_norm: float | None = None

    # Not fields: the rank's lazy installs (fl/installs.Installs, set by the federation when
    # they are on), and whether anything a checkpoint records of it changed since the last
    # complete checkpoint (True until one is written; Federation.checkpoint clears it).
    installs = None
    changed = True

    def __setattr__(self, name: str, value) -> None:
        if name in _RECORDED and not self._same(name, value):
            object.__setattr__(self, "changed", True)
        object.__setattr__(self, name, value)

    def _same(self, name: str, value) -> bool:
        """Whether assigning `value` leaves the checkpointed record as it is (a state
        assigned counts as new: comparing tensors would cost what writing them does)."""
        if name == "state" or (value is not None and name in ("pre_state", "residual", "progress")):
            return False
        old = getattr(self, name, _MISSING)
        if value is None or old is None:
            return old is value
        return type(old) is type(value) and old == value

    def release(self) -> None:
        """After each hosting: what the client keeps only while hosted (nothing here)."""

    @property
    def n(self) -> int:
        return len(self.train)

    # ------------------------------------------------------------------ transitions
    def start(self) -> TrainProgress | None:
        """Begin (PENDING) or continue (PARTIAL) this round's training; returns the
        progress to resume from (None: from the start)."""
        if self.status is Status.DONE:
            raise TransitionError(f"client {self.k}: start, but it already trained in this round")
        if self.status is Status.PENDING:
            self.pre_state = self.state
        return self.progress

    def interrupt(self, progress: TrainProgress, state: dict[str, torch.Tensor]) -> None:
        """A stop request inside training: keep `state` and where training stands. A
        progress at step 0 means the round restarts (the engine keeps no optimiser state),
        so the client keeps its round-start state instead."""
        if self.status is Status.DONE:
            raise TransitionError(f"client {self.k}: interrupt, but it already trained in this round")
        self.state = self.pre_state if progress.step == 0 else state
        self.status, self.progress = Status.PARTIAL, progress

    def finish(self, result: TrainResult, state: dict[str, torch.Tensor]) -> None:
        if self.status is Status.DONE:
            raise TransitionError(f"client {self.k}: finish, but it already trained in this round")
        self.state, self.status, self.progress = state, Status.DONE, None
        self.losses, self.steps, self.skipped = result.losses, result.steps, result.skipped
        self.seen = result.samples if result.timed_out else None

    def exclude(self) -> None:
        """A non-finite update: leave it out of the aggregation, back to the round start."""
        if self.status is not Status.DONE:
            raise TransitionError(f"client {self.k}: exclude, but its status is {self.status.value}")
        self.finite = False
        self.state = self.pre_state

    def drop(self, error: str) -> None:
        """Its local round raised: back to the round-start state, left out of the aggregation,
        with no losses or steps (the failed round's are not a result). DONE: an interrupted
        round does not retrain it."""
        if self.status is Status.DONE:
            raise TransitionError(f"client {self.k}: drop, but it already trained in this round")
        if self.pre_state is not None:
            self.state = self.pre_state
        self.status, self.progress, self.finite, self.error = Status.DONE, None, False, error
        self.losses, self.steps, self.skipped = {}, 0, 0

    def adopt(self, other: "ClientSlot") -> None:
        """Take another client's finished round (centralized: one model for everyone)."""
        self.state, self.losses, self.steps, self.status = other.state, other.losses, other.steps, Status.DONE
        self.skipped, self.finite = other.skipped, other.finite

    def next_round(self) -> None:
        self.status, self.pre_state, self.progress, self.finite = Status.PENDING, None, None, True
        self.error, self.seen = None, None

    # ------------------------------------------------------------------ checkpoints
    def record(self, complete: bool) -> ClientCheckpoint:
        """This client in a checkpoint: after a complete round it is PENDING for the next."""
        partial = not complete and self.status is Status.PARTIAL
        # A client done before an interruption keeps its round-start state too: the update it
        # sends after the resume may be a change from it (Transform.needs_start).
        keep_start = partial or (not complete and self.status is Status.DONE)
        return ClientCheckpoint(task=self.task, num_samples=self.n, state=self.state,
                                status=Status.PENDING if complete else self.status, steps=self.steps,
                                skipped=self.skipped, finite=self.finite, losses=self.losses,
                                pre_state=self.pre_state if keep_start else None,
                                progress=self.progress if partial else None, residual=self.residual,
                                installed=self.installed if self.installs is not None else None)

    def restore(self, rec: ClientCheckpoint, complete: bool) -> None:
        self.state, self.losses, self.steps, self.finite = rec.state, rec.losses, rec.steps, rec.finite
        self.skipped = rec.skipped
        self.status = Status.PENDING if complete else rec.status
        self.pre_state, self.progress = rec.pre_state, rec.progress
        self.residual = rec.residual
        if rec.installed is not None:
            self.installed = rec.installed
