"""Run under `mpiexec -n 2`: messages over 2 GiB through pilot_hpc.fl.comm.

MPI's classic counts are C ints (< 2^31); mpi4py 4 with an MPI-4 library (the pip
MPICH wheel) switches to the large-count calls, so a one-shot exchange of a big
model (fl.chunk_mb=0) still works. Exits 0 when every check passes on every rank.
"""

import sys

import numpy as np

from pilot_hpc.fl.comm import Comm

BIG = 2 ** 31 + 13  # items (bytes): above INT_MAX


def main() -> int:
    comm = Comm()
    buf = np.empty(BIG, dtype=np.uint8)
    if comm.rank == 0:
        buf[:] = 7
        buf[-1] = 9
    comm.bcast(buf, tag="big")
    assert buf[0] == 7 and buf[BIG // 2] == 7 and buf[-1] == 9, "bcast over 2 GiB"
    del buf
    # A gather whose total (and the last displacement's end) is above INT_MAX.
    each = BIG // 2 + 1
    local = np.full(each, comm.rank + 1, dtype=np.uint8)
    got = comm.gatherv(local, [each] * comm.size, tag="big")
    if comm.rank == 0:
        assert got.size == each * comm.size
        assert got[0] == 1 and got[each - 1] == 1 and got[each] == 2 and got[-1] == comm.size, "gatherv over 2 GiB"
    comm.close()
    print(f"rank {comm.rank}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
