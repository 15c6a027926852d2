"""The MPI half of `python -m pilot_hpc.tools.bench`: run under `mpiexec -n K` (one client per rank).

Each rank holds one LLaVA-7B-sized update (random, bf16 by default) and rank 0 measures:
- gather: the streamed Gatherv of every chunk of both parts, no mixing: bytes into rank 0
  per second (what the network and MPI deliver);
- exchange: one whole Pilot server step through StreamedExchange (ATA's Gram pass, the
  task-aware and ATA mixes, Bcast and Scatterv), with rank 0's peak resident memory
  above its level before the step (Linux VmHWM, reset through /proc/self/clear_refs);
  the second of two steps, as in every round after the first.
Prints one JSON line on rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from pilot_hpc.config import load_config
from pilot_hpc.fl.comm import Comm, block_ranges
from pilot_hpc.fl.strategies import get_strategy
from pilot_hpc.fl.stream import StreamedExchange, chunk_columns, spans
from pilot_hpc.fl.update import ClientUpdate, Part, Participation


def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--visual", type=int, required=True)
    ap.add_argument("--text", type=int, required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk-mb", type=float, default=64.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    comm = Comm()
    k = comm.size
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1 if comm.rank else max(1, torch.get_num_threads()))
    client_tasks = (["vqa", "caption", "grounding"] * k)[:k]
    cfg = load_config(None, [f"fl.num_clients={k}", f"fl.client_tasks={client_tasks}",
                             f"pilot.top_m={min(6, k - 1)}", f"fl.chunk_mb={args.chunk_mb}"])
    width = args.visual + args.text
    # Drawn in its own dtype: a float32 draw would double every rank's peak (9 x 0.7 GB).
    local = torch.randn(1, width, generator=torch.Generator().manual_seed(comm.rank), dtype=dtype)
    blocks = block_ranges(k, comm.size)
    ex = StreamedExchange(comm, blocks, torch.device("cpu"), args.chunk_mb)
    cols = chunk_columns(args.chunk_mb, local.element_size(), width)
    chunks = spans(0, width, cols)
    recv = torch.empty(k * min(cols, width), dtype=dtype) if comm.rank == 0 else None

    gather_s = []
    for _ in range(args.repeat):
        comm.barrier()
        t0 = time.perf_counter()
        for _block in ex.gather_blocks(local, chunks, recv, tag="bench"):
            pass
        gather_s.append(time.perf_counter() - t0)
    del recv

    aggregator = get_strategy("pilot", cfg).aggregator
    everyone = torch.ones(k, dtype=torch.bool)

    def updates() -> list[ClientUpdate]:  # views of `local`: no copy
        return [ClientUpdate(client=comm.rank, num_samples=1000 + comm.rank, status=Participation.PARTICIPATED,
                             parts={Part.SHARED_BY_TASK: local[0, :args.visual], Part.PERSONAL: local[0, args.visual:]})]

    # A first exchange warms up what every later round reuses (MPI's shared-memory
    # queues, the BLAS thread pool and scratch); the second one is measured.
    first = ex.run(aggregator, updates(), (args.visual, args.text), dtype, everyone)
    del first
    comm.barrier()
    rss0 = proc_status("VmRSS")
    peak_ok = reset_peak()
    t0 = time.perf_counter()
    got = ex.run(aggregator, updates(), (args.visual, args.text), dtype, everyone)
    exchange_s = time.perf_counter() - t0
    peak = proc_status("VmHWM") - rss0
    results = (got.shared.numel() + got.personal.numel()) * got.shared.element_size()
    if not bool(torch.isfinite(got.personal).all()):
        raise RuntimeError(f"rank {comm.rank}: the exchanged LoRA holds non-finite values")
    comm.close()
    if comm.rank == 0:
        print(json.dumps({
            "ranks": k, "visual": args.visual, "text": args.text, "dtype": args.dtype,
            "chunk_bytes": cols * local.element_size(), "chunks": len(chunks),
            "bytes_into_root": (k - 1) * width * local.element_size(), "gather_s": gather_s,
            "exchange_s": exchange_s, "peak_above_start": peak if peak_ok else None,
            "received_results_bytes": results,
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
