"""How a federation stops before its last round: the exceptions Federation.run raises
on every rank alike, and main turns into exit codes (75: resume; 2: bad input)."""

from __future__ import annotations

from pilot_hpc.errors import DataError


class Preempted(Exception):
    """All ranks agreed to stop (SIGTERM/SIGUSR2): a mid-round checkpoint was written."""

    def __init__(self, path: str):
        super().__init__(f"preempted: checkpoint {path} written; rerun the same command to resume")
        self.path = path


class BadSampleStop(DataError):
    """data.on_bad_sample=fail: a client met an unreadable sample, every rank stopped as
    for a preemption and the round's checkpoint is written; `sample` is the message
    (file, record, why) on the rank that met it, None on the others. Bad input (exit 2),
    not a preemption (exit 75)."""

    def __init__(self, path: str, sample: str | None):
        super().__init__(f"unreadable sample (data.on_bad_sample=fail); the round so far is in checkpoint {path}")
        self.path = path
        self.sample = sample


class NoFiniteUpdate(RuntimeError):
    """No client of the round produced a finite update: every one was excluded, so there is
    nothing to aggregate, and going on would repeat the round's start state as if it had
    trained. Raised on every rank (they learn it in the stop vote) before the exchange;
    the round writes no checkpoint, so the previous one stays the newest."""

    def __init__(self, round_: int, clients: list[int], lr_key: str, lr: float, newest: str | None):
        where = (f"{newest} is still the newest checkpoint (once the data is fixed, rerunning the same command "
                 "resumes there; a changed learning rate changes results, so it needs another run.output_dir or "
                 "run.resume=never)" if newest
                 else "no checkpoint was written before this round")
        super().__init__(f"round {round_}: the update of every client ({clients}) was non-finite (NaN/Inf), so all "
                         f"were excluded and nothing could be aggregated; the run stops without a checkpoint of "
                         f"round {round_}. Lower the learning rate ({lr_key}={lr!r} in this round's stage) or check "
                         f"the clients' data; {where}")
