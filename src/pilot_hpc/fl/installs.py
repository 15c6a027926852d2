"""Lazy installs: a client that sat a round out takes the server's broadcast rows when it is
next hosted, not in the round they came.

Under client sampling most clients sit most rounds out. Each of them must end up holding
what every client receives (docs/method.md, "Partial participation"): the finite broadcast
rows (Pilot: the task adapters; a NaN row, a task without participant, keeps its own) and,
for a global model, the global personal row. Installing them every round costs a hosting
(and with fl.client_state=disk a file read and write) per client per round, O(K).

Instead each rank keeps, once for all its clients, the latest finite value of every row
and the round it came from (`PendingRows`), and each client the last round whose answer it
holds (`ClientSlot.installed`). When the client is next hosted (to train, be evaluated,
or by export) it installs the rows newer than that round, then `sat_out` of the newest
round. Evaluation installs them into the model only: the client stays as it was (its
checkpoint record unchanged), and the next catch-up from its older round installs the
same values, each row's latest. This is bitwise the eager sequence (install round r's rows, sat_out(r), for every
round r it sat out) because:
  - install overwrites a fixed set of parameters with each finite row and keeps them for
    a NaN one, so of rounds a..b only each row's last finite value matters;
  - sat_out(r) depends only on the stage of round r; in a stage's later rounds it only
    repeats what it did in the stage's first round (idempotent), and a stage's first does
    what an earlier stage's would (Pilot: zero_pad's truncation of the LoRA, which no
    broadcast row touches). The first round of a stage after round 1 (a stage entry:
    Pilot's round 2, where sat_out starts the cross-task adapters from the own task
    adapter just installed) is a mark: the table is kept as it stood after it, and a
    client that lacks it installs up to the mark, sat_out of the mark, then the rest.
    Memory: the latest rows plus, per mark, the rows changed since (at most S rows each).
The rows are parameters only: a lossy fl.codec sends changes from each client's round
start (fl/coded.py), whose sums do not collapse, so there installs stay eager; so do
client groups (run.ranks_per_client > 1), whose members hold their leader's states.

A checkpoint stores the table (`/installs`) and each client's `installed` round, so a run
resumed or exported with installs pending gives the same numbers; export installs them.
"""

from __future__ import annotations

import os

import torch

# Tests set it to "1" to run the eager installs the lazy ones must equal bitwise.
EAGER_ENV = "PILOT_HPC_EAGER_INSTALLS"


class PendingRows:
    """The latest finite broadcast rows, `rows` {row: (round, values)}, the global personal
    row `personal` (round, values) or None, and `round`, the last round recorded; `marks`
    {b: (rows, personal)}: the same as they stood after each stage entry b."""

    def __init__(self):
        self.rows: dict[int, tuple[int, torch.Tensor]] = {}
        self.personal: tuple[int, torch.Tensor] | None = None
        self.marks: dict[int, tuple[dict, tuple | None]] = {}
        self.shape: tuple[int, int] = (0, 0)  # the broadcast matrix's [S, P]
        self.dtype = torch.float32
        self.round = 0
        # The run's tasks in id order (Config.tasks): row t is task t's, whatever order an
        # older checkpoint's sorted config reloads (export reads this instead).
        self.tasks: list[str] = []

    def record(self, round_: int, shared: torch.Tensor, personal: torch.Tensor | None, mark: bool = False) -> None:
        """Round `round_`'s answer: shared [S, P] (NaN row: no answer), personal [P] or None;
        mark: a stage entry, whose table a later catch-up installs on its own."""
        self.shape, self.dtype = tuple(shared.shape), shared.dtype
        self.rows = dict(self.rows)  # a mark keeps the old dict (its tensors are shared, not copied)
        for t in range(shared.shape[0]):
            if torch.isfinite(shared[t]).all():
                self.rows[t] = (round_, shared[t].clone())
        if personal is not None and torch.isfinite(personal).all():
            self.personal = (round_, personal.clone())
        self.round = round_
        if mark:
            self.marks[round_] = (self.rows, self.personal)

    def since(self, installed: int, at: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a client that holds the answers up to round `installed` lacks, of the table as
        it stands (or as it stood after stage entry `at`): [S, P] with the rows newer than
        that round and NaN elsewhere, and the personal row or None."""
        rows, personal = (self.rows, self.personal) if at is None else self.marks[at]
        shared = torch.full(self.shape, float("nan"), dtype=self.dtype)
        for t, (r, values) in rows.items():
            if r > installed:
                shared[t] = values
        return shared, personal[1] if personal is not None and personal[0] > installed else None

    # ------------------------------------------------------------------ checkpoints
    def to_record(self) -> dict:
        """What a checkpoint stores (checkpoint/store.py, /installs)."""
        return {"round": self.round, "shape": list(self.shape), "dtype": str(self.dtype).replace("torch.", ""),
                "tasks": self.tasks,
                "rows": self.rows, "personal": self.personal,
                "marks": {b: {"rows": rows, "personal": personal} for b, (rows, personal) in self.marks.items()}}

    @classmethod
    def from_record(cls, rec: dict | None) -> "PendingRows":
        out = cls()
        if rec:
            out.round, out.shape = int(rec["round"]), tuple(int(n) for n in rec["shape"])
            out.dtype, out.tasks = getattr(torch, rec["dtype"]), list(rec.get("tasks", []))
            out.rows, out.personal = dict(rec["rows"]), rec["personal"]
            out.marks = {int(b): (dict(m["rows"]), m["personal"]) for b, m in rec["marks"].items()}
        return out


def catch_up(policy, pm, pending: PendingRows, installed: int) -> bool:
    """Installs into the hosted client what it lacks since round `installed`: up to each
    stage entry it has not seen, then that entry's sat_out; then the rest and sat_out of
    the newest round (the module docstring says why that is the eager sequence). False:
    nothing to install."""
    if installed >= pending.round:
        return False
    for b in [b for b in sorted(pending.marks) if installed < b < pending.round] + [pending.round]:
        shared, personal = pending.since(installed, at=b if b != pending.round else None)
        policy.install(pm, shared, personal)
        policy.sat_out(pm, b)
        installed = b
    return True


def stage_entry(policy, round_: int) -> bool:
    """A round that starts a stage after round 1 (Pilot's round 2)."""
    return round_ > 1 and policy.stage(round_) != policy.stage(round_ - 1)


class Installs:
    """One rank's lazy installs (None-like when off: `active` False, nothing pending)."""

    def __init__(self, cfg, policy, aggregator):
        self.policy = policy
        # Off without sampling (nobody sits out), without an aggregator (no answer to
        # install), with changes on the wire or client groups (module docstring).
        self.active = (cfg.fl.clients_per_round != 0 and aggregator is not None and not cfg.fl.sends_changes()
                       and cfg.run.ranks_per_client == 1 and os.environ.get(EAGER_ENV) != "1")
        self.pending = PendingRows()
        self.pending.tasks = list(cfg.tasks)

    def catch_up(self, pm, slot, persist: bool = True) -> None:
        """Called by fl.client.hosting once the slot's state is in the model. persist=False
        (evaluation): into the model only; the slot keeps its state and installed round,
        and a later catch-up from there installs the same values (each row's latest)."""
        if catch_up(self.policy, pm, self.pending, slot.installed) and persist:
            slot.state = pm.get_state()
        if persist:
            slot.installed = self.pending.round

    def after_exchange(self, round_: int, got, slots: list, selected) -> None:
        """Round `round_`'s answer recorded for the clients that sat it out (the participants
        installed theirs: Federation.exchange_updates)."""
        if got.change:
            raise RuntimeError("lazy installs need parameter rows, but the exchange returned changes")
        self.pending.record(round_, got.shared, got.global_personal, mark=stage_entry(self.policy, round_))
        for slot in slots:
            if bool(selected[slot.k]):
                slot.installed = round_  # its answer is in (or, a bad update, it takes none of this round)

    def record(self) -> dict | None:
        """The checkpoint's /installs (None when off: the file is as without lazy installs)."""
        return self.pending.to_record() if self.active else None

    def linkable(self, slots: list, previous: str | None) -> tuple[list[int], str | None]:
        """(the clients a complete round's checkpoint links instead of writing, the file they
        link to): those unchanged since this run's previous complete checkpoint, when lazy
        installs are on and that file is still there (checkpoint/store.py, sealed clients)."""
        if not self.active or not previous or not os.path.exists(previous):
            return [], None
        return [s.k for s in slots if not s.changed], previous

    def restore(self, record: dict | None, slots: list, installed: dict[int, int | None]) -> None:
        """From a checkpoint: the table, and each client's installed round (None: it held
        everything the table holds)."""
        tasks = self.pending.tasks
        self.pending = PendingRows.from_record(record)
        self.pending.tasks = tasks
        for slot in slots:
            got = installed.get(slot.k)
            slot.installed = self.pending.round if got is None else got
