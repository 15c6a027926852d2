"""Run under `mpiexec -n 3`: the buffer collectives of pilot_hpc.fl.comm with odd sizes.

Exits 0 when every check passes on every rank; prints the failing check otherwise.
"""

import sys

import numpy as np
import torch

from pilot_hpc.fl.comm import Comm, block_ranges
from pilot_hpc.fl.flat import from_wire, to_wire, wire_dtype


def main() -> int:
    comm = Comm()
    rank, size = comm.rank, comm.size
    clients = 7  # K > W and not divisible: blocks of 2, 2, 3
    width = 5  # values per client
    blocks = block_ranges(clients, size)
    assert [len(b) for b in blocks] == [2, 2, 3], blocks
    mine = blocks[rank]
    # Client k sends k + [0, 0.1, ..., 0.4] rounded to bf16; compare the raw 2-byte words.
    updates = torch.stack([torch.arange(width, dtype=torch.float32) / 10 + k for k in mine]).to(torch.bfloat16)
    got = comm.gatherv(to_wire(updates.reshape(-1)), [len(b) * width for b in blocks], tag="update")
    if rank == 0:
        full = from_wire(got, torch.bfloat16).view(clients, width)
        expected = torch.stack([torch.arange(width, dtype=torch.float32) / 10 + k for k in range(clients)]).to(torch.bfloat16)
        assert torch.equal(full.view(torch.int16), expected.view(torch.int16)), "gatherv bf16 words differ"
    # Bcast of a float32 buffer every rank knows the shape of.
    shared = np.arange(11, dtype=np.float32) * (1 if rank == 0 else 0)
    comm.bcast(shared, tag="shared")
    assert np.array_equal(shared, np.arange(11, dtype=np.float32)), "bcast"
    # Scatterv: client k gets [k, k, k] (float64), including a rank with 3 clients.
    send = np.repeat(np.arange(clients, dtype=np.float64), 3) if rank == 0 else None
    recv = comm.scatterv(send, [len(b) * 3 for b in blocks], np.dtype(np.float64), tag="personal")
    assert np.array_equal(recv, np.repeat(np.array(list(mine), dtype=np.float64), 3)), "scatterv"
    # An empty contribution (zero-size update) must not break the collective.
    empty = comm.gatherv(np.zeros(0, dtype=np.float32), [0] * size, tag="empty")
    assert rank != 0 or empty.size == 0
    # all_ok is a logical AND over ranks.
    assert comm.all_ok(True) is True
    assert comm.all_ok(rank != 1) is False
    # The traffic log: rank 1 sent its 2 bf16 updates (2 x 5 x 2 bytes) and received 6 float64.
    if rank == 1:
        log = {t.tag: t for t in comm.traffic}
        assert log["update"].sent == 2 * width * 2 and log["update"].received == 0, log["update"]
        assert log["personal"].received == 2 * 3 * 8, log["personal"]
        assert log["shared"].received == 11 * 4, log["shared"]
    assert wire_dtype(torch.bfloat16) == np.int16
    print(f"rank {rank}: ok", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as err:
        print(f"rank {Comm().rank}: FAILED {err}", flush=True)
        sys.exit(1)
