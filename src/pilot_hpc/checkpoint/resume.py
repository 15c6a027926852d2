"""Checkpoint coordination across ranks: write one file per round, pick one to resume.

Writing: rank 0 creates `<name>.tmp` with the header and server state; each rank in
turn appends its clients (HDF5 has one writer at a time, and the clients' personal
state never crosses ranks); rank 0 fsyncs and renames. Resuming: rank 0 reads and
checks the candidates newest first (checksums, structure, result-changing config
fields), skipping broken ones with a warning; every rank then loads its own clients.

Both take what they need explicitly (a communicator, the config, the records), so
they can be driven without a Federation.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml

from pilot_hpc.checkpoint import store
from pilot_hpc.config import ConfigError, result_differences

log = logging.getLogger("pilot_hpc.resume")


@dataclass
class ResumePoint:
    path: str
    round: int
    complete: bool
    history: list  # metrics rows of the rounds done (meaningful on rank 0)
    clients: dict[int, store.ClientCheckpoint] = field(default_factory=dict)  # this rank's clients
    server: dict[str, torch.Tensor] = field(default_factory=dict)  # the strategy's server state
    installs: dict | None = None  # lazy installs' rows (store.Checkpoint.installs)


def folder_of(cfg) -> str:
    return os.path.join(cfg.run.output_dir, "checkpoints")


def save(comm, cfg, round_: int, *, complete: bool, history: list, server: dict[str, torch.Tensor],
         clients: dict[int, store.ClientCheckpoint], installs: dict | None = None, linked: list[int] = (),
         link_to: str | None = None) -> str:
    """Collective over comm: every rank passes its own clients' records; returns the path.
    installs (lazy installs, the same on every rank; rank 0's are written): the table,
    and the clients are sealed, those in `linked` (unchanged since the complete
    checkpoint `link_to`) linked to their record there (store.append_clients)."""
    folder = folder_of(cfg)
    final = os.path.join(folder, store.file_name(round_, complete))
    tmp = final + ".tmp"
    if comm.rank == 0:
        os.makedirs(folder, exist_ok=True)
        store.create(tmp, cfg, round_, complete=complete, history=history, server=server, installs=installs)
    for r in range(comm.size):
        comm.barrier()
        if r == comm.rank:
            store.append_clients(tmp, clients, linked, link_to, seal=installs is not None)
    comm.barrier()
    if comm.rank == 0:
        store.finalize(tmp, final)
        if complete:  # an interrupted round's file is superseded once the round completes
            for path, r, done in store.candidates(folder):
                if not done and r <= round_:
                    os.remove(path)
    # Nobody moves on before the file is final: rank 0's digest and rename take a moment
    # (~0.1 s here), and a rank that dies early in the next round would otherwise end the
    # job (mpiexec kills the rest) before round_NNN.h5 exists (tests/e2e/test_resilience.py
    # saw exactly that).
    comm.barrier()
    return final


def verify(path: str, num_clients: int, expected: dict) -> store.Checkpoint:
    """The whole file read, its content digest checked, and its structure checked against
    the model: the one check a checkpoint passes before it is chosen (the fuzz test in
    tests/unit/test_checkpoint_integrity.py drives exactly this). Raises CheckpointError."""
    ck = store.read(path)
    try:
        store.validate(ck, num_clients, expected)
    except store.CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any surprise in a file means "unusable", never a crash
        raise store.CheckpointError(f"checkpoint {path}: {type(err).__name__}: {err}") from None
    return ck


# What one run writes into run.output_dir. The lock file and launch.log belong to the
# folder, not to one run, and stay where they are.
RUN_OUTPUTS = ("checkpoints", "metrics.json", "results.md", "metrics.png", "predictions", "traffic", "tensorboard")
PREVIOUS = "previous"  # <output_dir>/previous/<time>/: an earlier run's files, moved aside on a start-over
UNUSABLE = "unusable"  # <output_dir>/checkpoints/unusable/: files found unusable, kept as evidence


def _unique(path: str) -> str:
    n, out = 1, path
    while os.path.lexists(out):
        n += 1
        out = f"{path}.{n}"
    return out


def set_aside_unusable(paths: list[str]) -> list[str]:
    """Moves checkpoint files found unusable into checkpoints/unusable/, so that redoing
    their round never overwrites what showed the fault. Returns the new paths."""
    moved = []
    for path in paths:
        folder = os.path.join(os.path.dirname(path), UNUSABLE)
        os.makedirs(folder, exist_ok=True)
        dest = _unique(os.path.join(folder, os.path.basename(path)))
        os.replace(path, dest)
        log.warning("resume: moved the unusable %s to %s (kept, not overwritten)", path, dest)
        moved.append(dest)
    return moved


def set_aside_previous(output_dir: str) -> str | None:
    """A run that starts over in a folder holding an earlier run's files moves them into
    <output_dir>/previous/<time>/ first: nothing a run wrote is overwritten or deleted by
    a later run that did not resume it. Returns that folder (None: nothing to move)."""
    present = [name for name in RUN_OUTPUTS if os.path.lexists(os.path.join(output_dir, name))]
    if not present:
        return None
    dest = _unique(os.path.join(output_dir, PREVIOUS, time.strftime("%Y%m%d-%H%M%S")))
    os.makedirs(dest)
    for name in present:
        os.replace(os.path.join(output_dir, name), os.path.join(dest, name))
    log.warning("starting over: moved the earlier run's %s to %s", ", ".join(present), dest)
    return dest


def _refuse_another_config(cfg, found: list[tuple[str, int, bool]]) -> None:
    """Every checkpoint whose header can be read must come from this configuration, bar
    the fields that do not change results: compared before any shape or client-count
    check, which a changed config (model.lora_r, fl.num_clients) would otherwise fail first
    and turn into "unusable, start over" over the earlier run's files."""
    for path, _, _ in found:
        try:
            attrs = store.read_header(path)
            if attrs["result_hash"] == cfg.result_hash():
                continue
            old = yaml.safe_load(attrs["config"])
        except (store.CheckpointError, yaml.YAMLError):
            continue  # unreadable: the full check below finds it unusable
        diffs = result_differences(old, cfg.to_dict()) if isinstance(old, dict) else ["config: unreadable"]
        if diffs:
            out = cfg.run.output_dir
            raise ConfigError(
                f"resume: {path} was written by a run with a config that changes results; differing fields: "
                f"{'; '.join(diffs)}. Nothing in {out} was changed. To keep that run, give this one another "
                f"run.output_dir (or go back to its config to resume it); to start over in {out}, add "
                f"run.restart=true: the earlier run's files are then moved to {os.path.join(out, PREVIOUS)}/<time>/, "
                "not deleted")


def _choose(cfg, num_clients: int, expected: dict) -> tuple[int, int]:
    """(round, complete) of the newest usable checkpoint, (-1, 0) for none (rank 0)."""
    found = store.candidates(folder_of(cfg))
    _refuse_another_config(cfg, found)
    unusable = []
    for path, round_, complete in found:
        try:
            verify(path, num_clients, expected)
        except store.CheckpointError as err:
            log.warning("resume: skipping %s: %s", path, err)
            unusable.append(path)
            continue
        if complete and round_ >= cfg.fl.rounds:
            log.info("resume: %s is the last round already", path)
        log.info("resume: continuing from %s (round %d, %s)", path, round_,
                 "complete" if complete else "interrupted mid-round")
        set_aside_unusable(unusable)
        return round_, int(complete)
    if found:
        log.warning("resume: none of the %d checkpoint file(s) in %s is usable: starting over from round 0",
                    len(found), folder_of(cfg))
    return -1, 0


def _start_point(cfg, num_clients: int, expected: dict) -> tuple[int, int]:
    """Rank 0: the resume choice; on a start-over, the folder's earlier files set aside."""
    choice = (-1, 0)
    if cfg.run.resume == "auto" and not cfg.run.restart:
        choice = _choose(cfg, num_clients, expected)
    if choice[0] < 0:
        set_aside_previous(cfg.run.output_dir)
    return choice


def locate(comm, cfg, expected: dict[str, tuple[int, ...]], my_clients: list[int]) -> ResumePoint | None:
    """Collective over comm: the resume point (None: start over) with this rank's clients'
    records. `expected` maps every state key to its shape in the model being resumed."""
    choice = np.array([-1, 0], dtype=np.int64)
    refused = None
    if comm.rank == 0:
        try:
            choice[:] = _start_point(cfg, cfg.fl.num_clients, expected)
        except ConfigError as err:
            refused = err
            choice[:] = (-2, 0)
        except OSError as err:  # the earlier files could not be moved aside: touch nothing more
            refused = ConfigError(f"resume: {cfg.run.output_dir}: cannot move an earlier run's files aside "
                                  f"({err}); fix the folder's permissions or set another run.output_dir")
            choice[:] = (-2, 0)
    comm.bcast(choice, tag="resume")
    if choice[0] == -2:
        raise refused if refused is not None else ConfigError("resume refused on rank 0 (see its message)")
    if choice[0] < 0:
        return None
    round_, complete = int(choice[0]), bool(choice[1])
    path = os.path.join(folder_of(cfg), store.file_name(round_, complete))
    # Rank 0 verified the whole file (digest included); a rank that still cannot read
    # its clients (the file replaced meanwhile, a failing disk) stops every rank cleanly.
    ck, problem = None, None
    try:
        ck = store.read(path, clients=my_clients)
    except store.CheckpointError as err:
        problem = err
        log.error("resume: rank %d: %s", comm.rank, err)
    if not comm.all_ok(problem is None):
        raise ConfigError(f"resume: {problem}" if problem is not None else
                          f"resume: another rank could not read its clients from {path} (see its message); "
                          "move the file aside or add run.restart=true")
    return ResumePoint(path=path, round=round_, complete=complete, history=ck.history, clients=ck.clients,
                       server=ck.server, installs=ck.installs)
