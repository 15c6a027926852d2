"""Checkpoint coordination across ranks: write one file per round, pick one to resume.

Writing: rank 0 creates `<name>.tmp` with the header and server state; each rank in
turn appends its clients (HDF5 has one writer at a time, and the clients' personal
state never crosses ranks); rank 0 fsyncs and renames. Resuming: rank 0 reads and
checks the candidates newest first (checksums, structure, result-changing config
fields), skipping broken ones with a warning; every rank then loads its own clients.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import yaml

from pilot_hpc import checkpoint
from pilot_hpc.config import ConfigError, result_differences
from pilot_hpc.train import TrainProgress

log = logging.getLogger("pilot_hpc.resume")


@dataclass
class ResumePoint:
    path: str
    round: int
    complete: bool
    history: list  # metrics rows of the rounds done (meaningful on rank 0)


def folder_of(cfg) -> str:
    return os.path.join(cfg.run.output_dir, "checkpoints")


def _record(slot, complete: bool) -> checkpoint.ClientCheckpoint:
    partial = not complete and slot.status == "partial"
    progress = None
    if partial:
        p = slot.progress
        progress = {"step": p.step, "samples": p.samples, "sums": p.sums, "torch_rng": p.torch_rng,
                    "optimizer": p.optimizer}
    return checkpoint.ClientCheckpoint(
        task=slot.task, num_samples=slot.n, state=slot.state, status="pending" if complete else slot.status,
        steps=slot.steps, finite=slot.finite, losses=slot.losses,
        pre_state=slot.pre_state if partial else None, progress=progress)


def save(fed, round_: int, *, complete: bool, history: list) -> str:
    comm, cfg = fed.comm, fed.cfg
    folder = folder_of(cfg)
    final = os.path.join(folder, checkpoint.file_name(round_, complete))
    tmp = final + ".tmp"
    if comm.rank == 0:
        os.makedirs(folder, exist_ok=True)
        checkpoint.create(tmp, cfg, round_, complete=complete, history=history, server=fed.strategy.server_state())
    for r in range(comm.size):
        comm.barrier()
        if r == comm.rank:
            checkpoint.append_clients(tmp, {s.k: _record(s, complete) for s in fed.slots})
    comm.barrier()
    if comm.rank == 0:
        checkpoint.finalize(tmp, final)
        if complete:  # an interrupted round's file is superseded once the round completes
            for path, r, done in checkpoint.candidates(folder):
                if not done and r <= round_:
                    os.remove(path)
    return final


def _choose(cfg, num_clients: int, expected: dict) -> tuple[int, int]:
    """(round, complete) of the newest usable checkpoint, (-1, 0) for none (rank 0)."""
    for path, round_, complete in checkpoint.candidates(folder_of(cfg)):
        try:
            ck = checkpoint.read(path)
            checkpoint.validate(ck, num_clients, expected)
        except checkpoint.CheckpointError as err:
            log.warning("resume: skipping %s: %s", path, err)
            continue
        if ck.attrs["result_hash"] != cfg.result_hash():
            diffs = result_differences(yaml.safe_load(ck.attrs["config"]), cfg.to_dict())
            if diffs:
                raise ConfigError(f"resume: {path} was written with a config that changes results; differing "
                                  f"fields: {'; '.join(diffs)}. Use the same config, another run.output_dir, "
                                  "or run.resume=never")
        if complete and round_ >= cfg.fl.rounds:
            log.info("resume: %s is the last round already", path)
        log.info("resume: continuing from %s (round %d, %s)", path, round_,
                 "complete" if complete else "interrupted mid-round")
        return round_, int(complete)
    return -1, 0


def locate(fed, expected: dict) -> ResumePoint | None:
    """Every rank: the resume point (or None) and its own clients restored into fed.slots."""
    comm, cfg = fed.comm, fed.cfg
    choice = np.array([-1, 0], dtype=np.int64)
    refused = None
    if comm.rank == 0 and cfg.run.resume == "auto":
        try:
            choice[:] = _choose(cfg, fed.num_clients, expected)
        except ConfigError as err:
            refused = err
            choice[:] = (-2, 0)
    comm.bcast(choice, tag="resume")
    if choice[0] == -2:
        raise refused if refused is not None else ConfigError("resume refused on rank 0 (see its message)")
    if choice[0] < 0:
        return None
    round_, complete = int(choice[0]), bool(choice[1])
    path = os.path.join(folder_of(cfg), checkpoint.file_name(round_, complete))
    ck = checkpoint.read(path, clients=[s.k for s in fed.slots])
    for slot in fed.slots:
        rec = ck.clients[slot.k]
        slot.state, slot.losses, slot.steps, slot.finite = rec.state, rec.losses, rec.steps, rec.finite
        slot.status = "pending" if complete else rec.status
        slot.pre_state = rec.pre_state
        if rec.progress is not None:
            p = rec.progress
            slot.progress = TrainProgress(step=p["step"], samples=p["samples"], sums=p["sums"],
                                          optimizer=p["optimizer"], torch_rng=p["torch_rng"])
    fed.strategy.load_server_state(ck.server)
    return ResumePoint(path=path, round=round_, complete=complete, history=ck.history)
