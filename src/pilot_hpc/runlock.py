"""One job per output folder, and no MPICH shared-memory segment left behind.

The lock: rank 0 takes an exclusive `flock` on <run.output_dir>/.pilot_hpc.lock before
anything else writes there, and holds it until its process ends (the kernel drops it
then, so a crashed job leaves no stale lock: the file stays, the lock does not). The
file holds the holder as JSON (host, pid, Slurm job id, start time), so that a second
job can say who has the folder. Two jobs in one folder otherwise interleave their
checkpoint writes (seen: one died on HDF5's file lock, the other left a corrupt
round_001.h5). flock is per host on some network file systems (NFS without lock
forwarding): the holder's host is in the message for that reason.

MPICH segments: MPICH 5 names its node's shared-memory slab /dev/shm/mpich_shm_<world
id>_<node id> and unlinks it at MPI_Finalize; after MPI_Abort it stays (3 MB here), and
a later job with the same PMI world id can hang on it (README, Troubleshooting). A
rank finds the segments that are its own job's in /proc/self/maps (it maps them), so
no name is ever guessed: the aborting rank unlinks its own before MPI_Abort, and rank 0
records its node's segments in the lock file, which the next job in the folder removes
when they are still there and no live process maps them.

Pure standard library: main imports this before torch or MPI.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

LOCK_NAME = ".pilot_hpc.lock"
SHM_DIR = "/dev/shm"
SHM_PREFIXES = ("mpich_shm_", "mpich_vci_")


class FolderBusy(RuntimeError):
    """Another live job holds the output folder's lock."""


def holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "shm_segments": []}


def describe(info: dict) -> str:
    if not info:
        return "holder unknown"
    job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"held by pid {info.get('pid')} on {info.get('host')}{job}, started {info.get('started')}"


class RunLock:
    """The output folder's lock, held by this process (rank 0) until it exits."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.info: dict = {}
        self.previous: dict = {}
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Takes the lock or raises FolderBusy naming the folder and, when known, the holder;
        an OSError (a read-only or missing parent folder) passes through."""
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # Python fds are close-on-exec
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            held = _read_info(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderBusy(f"run.output_dir {self.folder} is in use by another job ({describe(held)}); "
                                 "wait for it to end, or give this job another run.output_dir") from None
            raise
        self._fd = fd
        self.previous = _read_info(fd)
        self.info = holder_info()
        self._write()
        return self

    def _write(self) -> None:
        blob = json.dumps(self.info, sort_keys=True).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, blob + b"\n", 0)

    def record_segments(self, segments: list[str]) -> None:
        """The MPICH segments this job maps on rank 0's node (removed by the next job if
        an abort leaves them)."""
        if self._fd is None:
            return
        self.info["shm_segments"] = sorted(segments)
        self._write()

    def clean_previous(self) -> list[str]:
        """Removes the segments the folder's previous job recorded, when that job ran on this
        host, the segment is still there and no live process maps it. Returns the removed."""
        prev = self.previous
        if not prev or prev.get("host") != socket.gethostname():
            return []
        return remove_segments([s for s in prev.get("shm_segments", []) if not mapped_by_anyone(s)])


def _read_info(fd: int) -> dict:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        info = json.loads(raw.decode() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------- shm
def _is_segment(path: str) -> bool:
    return os.path.dirname(path) == SHM_DIR and os.path.basename(path).startswith(SHM_PREFIXES)


def own_segments(maps: str = "/proc/self/maps") -> list[str]:
    """The /dev/shm/mpich_* files this process has mapped (its own job's, by construction)."""
    try:
        with open(maps) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    found = set()
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            path = parts[5].replace(" (deleted)", "").strip()
            if _is_segment(path):
                found.add(path)
    return sorted(found)


def mapped_by_anyone(path: str) -> bool:
    """True when a process this user can see maps `path` (then it is no leftover)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as fh:
                if path in fh.read():
                    return True
        except OSError:
            continue
    return False


def remove_segments(paths: list[str]) -> list[str]:
    """Unlinks the given MPICH segments (only /dev/shm/mpich_* names); returns the removed."""
    removed = []
    for path in paths:
        if not _is_segment(path):
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # another user's file, or a read-only /dev/shm: nothing this job may do
    return removed
