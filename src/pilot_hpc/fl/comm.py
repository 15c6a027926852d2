"""The only module that imports mpi4py: it moves bytes, nothing else.

Parameters cross ranks only through buffer methods (Gatherv / Bcast / Scatterv on
contiguous numpy arrays), never through pickle. Collectives are started
non-blocking and waited on with short sleeps: MPICH busy-polls in a blocking wait,
and with 9 ranks on 2 cores the waiting ranks would steal the CPU from the ones
still training (or from the server while it aggregates).

Every call records (op, tag, bytes sent by this rank, bytes received by this rank)
in `self.traffic`, so tests can check exactly what crossed ranks.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI


@dataclass
class Traffic:
    op: str
    tag: str
    sent: int
    received: int


def block_ranges(num_items: int, world: int) -> list[range]:
    """Contiguous, balanced blocks: item k lives on the rank whose block holds it."""
    return [range(r * num_items // world, (r + 1) * num_items // world) for r in range(world)]


STOP_TAG = 17
DATA_POLL_S = 1e-4  # longest sleep between tests while parameters are moving
ABORT_GRACE_S = 1.0  # time for the last messages to leave before MPI_Abort


class Comm:
    """COMM_WORLD (or a part of it, see split_clients) with the project's collectives."""

    def __init__(self, poll_max_s: float = 0.02, world=None, traffic: list[Traffic] | None = None):
        self.world = MPI.COMM_WORLD if world is None else world
        self.rank = self.world.Get_rank()
        self.size = self.world.Get_size()
        self.poll_max_s = poll_max_s
        self.traffic: list[Traffic] = [] if traffic is None else traffic
        self._stop_req = None
        self._stop_local = False
        self._told_others = False
        self._stop_sends: list = []
        if world is not None:
            return  # a sub-communicator: stop requests travel on the whole world's Comm
        # Stop requests (SIGTERM/SIGUSR2 on any rank) travel as point-to-point messages
        # on a private communicator, so a rank deep in local training hears of a signal
        # that reached another rank at its next step, without any collective.
        self.ctrl = self.world.Dup()
        self._stop_in = np.zeros(1, dtype=np.int32)
        self._stop_req = self.ctrl.Irecv(self._stop_in, source=MPI.ANY_SOURCE, tag=STOP_TAG)

    def split_clients(self, ranks_per_client: int) -> tuple["Comm | None", "Comm"]:
        """(leaders, group): COMM_WORLD cut into client groups of consecutive ranks.

        `group` holds this rank's client (data-parallel inside it); `leaders` holds the
        first rank of every group (None on the other ranks): the federation's ranks,
        the server being leader 0. Both log into this Comm's traffic list."""
        color = self.rank // ranks_per_client
        group = Comm(self.poll_max_s, self.world.Split(color, self.rank), self.traffic)
        lead = self.world.Split(0 if self.rank % ranks_per_client == 0 else MPI.UNDEFINED, self.rank)
        leaders = None if lead == MPI.COMM_NULL else Comm(self.poll_max_s, lead, self.traffic)
        return leaders, group

    def bcast_object(self, value, root: int = 0):
        """A small control value (a port, a host name) from root to every rank. Pickled:
        never use it for parameters."""
        return self.world.bcast(value, root=root)

    # ---------------------------------------------------------------- stop requests
    def request_stop(self) -> None:
        """Called from a signal handler: only sets a flag (no MPI inside a handler)."""
        self._stop_local = True

    def stop_requested(self) -> bool:
        """True once this rank got a signal or heard of one; tells the other ranks once."""
        if self._stop_local:
            if not self._told_others:
                self._told_others = True
                one = np.ones(1, dtype=np.int32)
                self._stop_sends = [self.ctrl.Isend(one, dest=r, tag=STOP_TAG)
                                    for r in range(self.size) if r != self.rank]
            return True
        if self._stop_req is not None and self._stop_req.Test():
            self._stop_req = None
            # Heard from another rank, which told everyone already.
            self._stop_local = self._told_others = True
            return True
        return False

    def close(self) -> None:
        """Settles the stop channel before MPI finalises (no request left pending)."""
        if not hasattr(self, "ctrl"):
            return
        if self._stop_req is not None:
            self._stop_req.Cancel()
            self._stop_req.Wait()
            self._stop_req = None
        for req in self._stop_sends:
            req.Wait()
        sink = np.zeros(1, dtype=np.int32)
        while self.ctrl.Iprobe(source=MPI.ANY_SOURCE, tag=STOP_TAG):
            self.ctrl.Recv(sink, source=MPI.ANY_SOURCE, tag=STOP_TAG)

    # ---------------------------------------------------------------- waiting
    def _wait(self, req, fast: bool = False) -> None:
        """Test with growing sleeps instead of a busy Wait (see module docstring).

        MPICH moves data only inside MPI calls (no progress thread), so while
        parameters move (`fast`) the sleeps stay within 10-100 us: a 64 MiB-chunk
        Gatherv into rank 0 of 9 ranks on the 2-core machine ran at 9.0 GB/s with the
        20 ms cap, 14.4 GB/s with 1 ms and 16.9 GB/s with 100 us; a multi-step Bcast
        stalls on its sleepiest rank at every step."""
        pause, cap = (1e-5, DATA_POLL_S) if fast else (1e-4, self.poll_max_s)
        while not req.Test():
            time.sleep(pause)
            pause = min(pause * 2, cap)

    def barrier(self) -> None:
        self._wait(self.world.Ibarrier())

    def _log(self, op: str, tag: str, sent: int, received: int) -> None:
        self.traffic.append(Traffic(op, tag, int(sent), int(received)))

    # ---------------------------------------------------------------- collectives
    @staticmethod
    def _displs(counts: list[int]) -> list[int]:
        return [int(x) for x in np.concatenate([[0], np.cumsum(counts)[:-1]])]

    def gatherv(self, local: np.ndarray | None, counts: list[int], tag: str, root: int = 0,
                out: np.ndarray | None = None, fast: bool = True) -> np.ndarray | None:
        """Concatenates every rank's 1-D `local` (counts[r] items from rank r) on root.

        On root, `out` (sum(counts) items) is the receive buffer when given; `local=None`
        on root means its own part is already in `out` at its place (MPI_IN_PLACE: no
        extra copy of the root's chunk). Counts above 2^31 use MPI-4's large-count path.
        fast=False for a gather that waits on ranks still busy (e.g. evaluating).
        """
        if self.rank == root and local is None:
            if out is None:
                raise ValueError(f"gatherv({tag}): an in-place gather needs the receive buffer `out`")
            mine = counts[root]
        else:
            if local.ndim != 1 or not local.flags.c_contiguous:
                raise ValueError("gatherv: the local buffer must be a contiguous 1-D array")
            if local.size != counts[self.rank]:
                raise ValueError(f"gatherv({tag}): rank {self.rank} holds {local.size} items, "
                                 f"counts say {counts[self.rank]}")
            mine = local.size
        recv = None
        if self.rank == root:
            dtype = out.dtype if out is not None else local.dtype
            recv = out if out is not None else np.empty(sum(counts), dtype=dtype)
            if recv.size != sum(counts) or not recv.flags.c_contiguous:
                raise ValueError(f"gatherv({tag}): the receive buffer must be contiguous with {sum(counts)} items")
            send = MPI.IN_PLACE if local is None else local
            self._wait(self.world.Igatherv(send, [recv, (list(counts), self._displs(counts))], root=root), fast)
            self._log("gatherv", tag, 0, (sum(counts) - mine) * recv.itemsize)
        else:
            self._wait(self.world.Igatherv(local, None, root=root), fast)
            self._log("gatherv", tag, local.nbytes, 0)
        return recv

    def bcast(self, buf: np.ndarray, tag: str, root: int = 0, fast: bool = True) -> np.ndarray:
        """In-place broadcast of a contiguous array whose shape and dtype every rank knows."""
        if not buf.flags.c_contiguous:
            raise ValueError("bcast: the buffer must be contiguous")
        self._wait(self.world.Ibcast(buf, root=root), fast)
        self._log("bcast", tag, buf.nbytes * (self.size - 1) if self.rank == root else 0,
                  buf.nbytes if self.rank != root else 0)
        return buf

    def scatterv(self, send: np.ndarray | None, counts: list[int], dtype: np.dtype, tag: str,
                 root: int = 0, out: np.ndarray | None = None, root_in_place: bool = False,
                 fast: bool = True) -> np.ndarray | None:
        """Rank r receives counts[r] items of root's 1-D `send` (blocks in rank order).

        `out` is the receive buffer when given; with root_in_place the root receives
        nothing (it reads its own part of `send` where it is) and gets None back.
        """
        if self.rank == root:
            if send is None or send.size != sum(counts):
                raise ValueError(f"scatterv({tag}): root buffer size does not match counts {counts}")
            recv = None if root_in_place else (out if out is not None else np.empty(counts[root], dtype=dtype))
            self._wait(self.world.Iscatterv([send, (list(counts), self._displs(counts))],
                                            MPI.IN_PLACE if recv is None else recv, root=root), fast)
            self._log("scatterv", tag, (sum(counts) - counts[root]) * send.itemsize, 0)
            return recv
        recv = out if out is not None else np.empty(counts[self.rank], dtype=dtype)
        if recv.size != counts[self.rank]:
            raise ValueError(f"scatterv({tag}): rank {self.rank} expects {counts[self.rank]} items, "
                             f"its buffer holds {recv.size}")
        self._wait(self.world.Iscatterv(None, recv, root=root), fast)
        self._log("scatterv", tag, 0, recv.nbytes)
        return recv

    def all_ok(self, ok: bool) -> bool:
        """True when every rank says ok (used to stop all ranks cleanly on bad input)."""
        flag = np.array([1 if ok else 0], dtype=np.int32)
        out = np.empty(1, dtype=np.int32)
        self._wait(self.world.Iallreduce(flag, out, op=MPI.MIN))
        self._log("allreduce", "all_ok", flag.nbytes, out.nbytes)
        return bool(out[0])

    def any(self, flag: bool, tag: str) -> bool:
        """True when any rank says True (e.g. "a client of mine was stopped")."""
        return self.any_each([flag], tag)[0]

    def any_each(self, flags: list[bool], tag: str) -> list[bool]:
        """Several `any` votes in one allreduce: position i is True when any rank says
        True there."""
        send = np.array([1 if f else 0 for f in flags], dtype=np.int32)
        out = np.empty(len(flags), dtype=np.int32)
        self._wait(self.world.Iallreduce(send, out, op=MPI.MAX))
        self._log("allreduce", tag, send.nbytes, out.nbytes)
        return [bool(v) for v in out]

    def abort(self, code: int) -> None:
        """Ends every rank of the job (a rank stuck in a collective would wait forever)."""
        sys.stdout.flush()
        sys.stderr.flush()
        # MPI_Abort tears down mpiexec's forwarding proxies at once; a message still in
        # the pipe to them (the failure's traceback) was lost in a loaded test run.
        time.sleep(ABORT_GRACE_S)
        self.world.Abort(code)
