"""The streamed exchange: updates cross ranks in column chunks, mixed as they arrive.

At the paper's scale one client's update is ~181M parameters (python -m pilot_hpc.tools.dryrun), so a
one-shot Gatherv would put K x 362 MB (bf16) on rank 0, which also trains a 7B
client. Here every part of the update (visual, then text) travels in chunks of c
columns of all K clients, and the server holds one chunk at a time:

    Gatherv [K, c] -> mix in place into its first R rows -> Bcast (shared rows)
                                                         or Scatterv (row k to client k)

Every strategy's aggregation is a linear mix C @ U (see aggregate.py) whose
coefficients need only the sample counts, the good-client flags and, for ATA, the
K x K Gram matrix. ATA's distances need every column before any mixing, so ATA makes
two passes over the text part: pass 1 gathers the chunks and accumulates the Gram
matrix in float64; pass 2 gathers them again and mixes. That costs one more upload
of the LoRA, in exchange for a window that does not grow with the model.

Server memory beyond its own model: the [K, c] receive buffer (its own rows are
written into it in place, MPI_IN_PLACE) plus the mixing temporaries, which work on
cache-sized column blocks: well within (K + 2) x chunk.

GPU tensors reach MPI through pinned host buffers (the pip MPI wheels are not
CUDA-aware): a client copies chunk i + 1 to the host on a side stream while chunk i
is on the wire; the server mixes on its device, block by block, from a pinned
receive buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pilot_hpc.fl import aggregate
from pilot_hpc.fl.flat import from_wire, to_wire


# Columns per mixing sub-block on the CPU: a [9, 16384] float32 block (576 KiB) stays in
# the L2 cache. Measured on the 2-core dev machine, 9 x 18M bf16 values: mixing in
# 64k-column blocks 0.30 s, in 4M-column blocks 1.8 s; a float64 Gram 7.5 s, the
# centred float32 one below 0.45 s (a torch sum over the same bytes: 0.75 s).
SUB_BLOCK = 1 << 14


def chunk_columns(chunk_mb: float, itemsize: int, width: int) -> int:
    """Columns per chunk: chunk_mb MiB of one client's row (0: the whole part at once),
    rounded down to a multiple of SUB_BLOCK when larger, so that the sub-blocks (and so
    every float sum) are the same whatever the chunk size."""
    if chunk_mb <= 0:
        return max(width, 1)
    cols = max(1, int(chunk_mb * (1 << 20)) // itemsize)
    return cols - cols % SUB_BLOCK if cols >= SUB_BLOCK else cols


def spans(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def host_buffer(numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A flat host tensor; page-locked when it feeds a GPU (fast async copies)."""
    return torch.empty(numel, dtype=dtype, pin_memory=pinned)


def sub_block(block: torch.Tensor, device: torch.device) -> int:
    """Columns per mixing step: cache-sized on the CPU, the whole chunk on a GPU (one
    kernel launch per chunk rather than thousands)."""
    return max(1, block.shape[1]) if device.type == "cuda" else SUB_BLOCK


class HostChunks:
    """Column chunks of `rows` [R, P] as contiguous host arrays in the wire format.

    On CUDA the copies go through two pinned buffers on a side stream: asking for
    chunk i waits for its copy and starts chunk i + 1's, which then overlaps the
    collective that sends chunk i. The caller must be done with chunk i - 1's array
    (its collective completed) before asking for chunk i + 1.
    """

    def __init__(self, rows: torch.Tensor, chunks: list[tuple[int, int]]):
        self.rows, self.chunks = rows, chunks
        self.cuda = rows.is_cuda
        if self.cuda and chunks:
            width = max(b - a for a, b in chunks)
            self.bufs = [host_buffer(rows.shape[0] * width, rows.dtype, True) for _ in range(2)]
            self.stream = torch.cuda.Stream(device=rows.device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self._start(0)

    def _view(self, i: int) -> torch.Tensor:
        a, b = self.chunks[i]
        return self.bufs[i % 2][: self.rows.shape[0] * (b - a)].view(self.rows.shape[0], b - a)

    def _start(self, i: int) -> None:
        a, b = self.chunks[i]
        self.stream.wait_stream(torch.cuda.current_stream(self.rows.device))
        with torch.cuda.stream(self.stream):
            self._view(i).copy_(self.rows[:, a:b], non_blocking=True)
            self.ready[i % 2].record(self.stream)

    def __getitem__(self, i: int) -> np.ndarray:
        if not self.cuda:
            a, b = self.chunks[i]
            return to_wire(self.rows[:, a:b].contiguous().reshape(-1))
        self.ready[i % 2].synchronize()
        if i + 1 < len(self.chunks):
            self._start(i + 1)
        return to_wire(self._view(i).reshape(-1))


def mix_in_place(coef: torch.Tensor, block: torch.Tensor, device: torch.device, finish=None) -> torch.Tensor:
    """block[:R] = coef [R, K] @ block [K, c] (a host tensor, overwritten) -> block[:R].

    Runs on `device` one column sub-block at a time, so the temporaries stay small.
    `finish(rows, col)` is the strategy's element-wise step on each mixed sub-block,
    in place, col being its first column within the block."""
    r = coef.shape[0]
    if r > block.shape[0]:
        raise ValueError(f"mix_in_place: {r} output rows do not fit a block of {block.shape[0]} clients")
    work = aggregate.work_dtype(block.dtype)
    c = coef.to(device=device, dtype=work)
    step = sub_block(block, device)
    for a in range(0, block.shape[1], step):
        sub = block[:, a:a + step].to(device=device, dtype=work, non_blocking=True)  # [K, s]
        out = (c @ sub).to(block.dtype)  # [R, s]
        if finish is not None:
            finish(out, a)
        block[:r, a:a + step].copy_(out)
    return block[:r]


def gram_in_place(gram: torch.Tensor, block: torch.Tensor, device: torch.device, ref: int = 0) -> None:
    """gram [K, K] += centred block products, summed in float64.

    Each sub-block is centred on client `ref`'s row before its float32 product: the
    distances d_ki^2 = G_kk + G_ii - 2 G_ki do not change under a common shift, and
    centring keeps the entries of the order of the distances themselves (LoRA
    updates of clients that started from the same point are close, and an uncentred
    float32 Gram would lose them to cancellation). Pass a good client as `ref`."""
    step = sub_block(block, device)
    work = aggregate.work_dtype(block.dtype)
    for a in range(0, block.shape[1], step):
        sub = block[:, a:a + step].to(device=device, dtype=work, non_blocking=True)
        sub = sub - sub[ref]
        gram += (sub @ sub.T).to(torch.float64)


@dataclass
class Received:
    shared: torch.Tensor  # [S, Pv] host tensor: the broadcast rows (every rank)
    personal: torch.Tensor  # [n_local, Pt] host tensor: this rank's clients' rows
    excluded: list[int] | None  # on the server: clients left out (non-finite update)


class StreamedExchange:
    """One round's Gatherv -> mix -> Bcast/Scatterv, chunk by chunk (module docstring)."""

    def __init__(self, comm, blocks: list[range], device: torch.device, chunk_mb: float, root: int = 0):
        self.comm, self.blocks, self.device, self.chunk_mb, self.root = comm, blocks, device, chunk_mb, root
        self.num_clients = sum(len(b) for b in blocks)
        self.sizes = [len(b) for b in blocks]
        self.first = blocks[comm.rank].start
        self.server = comm.rank == root

    def run(self, strategy, local: torch.Tensor, meta: np.ndarray, p_vis: int, tasks: torch.Tensor,
            num_tasks: int) -> Received:
        """local [n_local, Pv + Pt]: this rank's clients' updates (zeros for a bad one);
        meta [n_local, 2]: (samples, good) per client."""
        comm, k, dtype = self.comm, self.num_clients, local.dtype
        width = local.shape[1]
        cols = chunk_columns(self.chunk_mb, local.element_size(), width)
        meta_all = comm.gatherv(np.ascontiguousarray(meta, dtype=np.int64).reshape(-1),
                                [2 * s for s in self.sizes], tag="num_samples", root=self.root, fast=False)
        # The server's window: one [K, c] receive buffer, reused by every chunk.
        recv = host_buffer(k * min(cols, max(width, 1)), dtype, self.device.type == "cuda") if self.server else None
        plan = gram = None
        if self.server:
            counts = torch.from_numpy(meta_all.reshape(k, 2))
            n, good = counts[:, 0], counts[:, 1].bool()
            if strategy.needs_gram:
                gram = torch.zeros(k, k, dtype=torch.float64, device=self.device)
        if strategy.needs_gram:  # pass 1 (ATA): the Gram matrix of the text updates
            for block in self.gather_blocks(local, spans(p_vis, width, cols), recv, tag="gram"):
                if block is not None:
                    gram_in_place(gram, block[1], self.device, ref=int(good.nonzero()[0]) if good.any() else 0)
        if self.server:
            plan = strategy.plan(n, tasks, num_tasks, good, gram.cpu() if gram is not None else None)
        shared = torch.empty(strategy.shared_rows(num_tasks), p_vis, dtype=dtype)
        personal = torch.empty(self.sizes[comm.rank], width - p_vis, dtype=dtype)
        if not self.server:  # receive buffers, reused by every chunk (fresh ones per chunk
            # grew the clients' resident memory by ~1 GB per 7B exchange, measured)
            self.shared_in = host_buffer(shared.shape[0] * min(cols, max(p_vis, 1)), dtype, False)
            self.personal_in = host_buffer(personal.shape[0] * min(cols, max(width - p_vis, 1)), dtype, False)
        visual = spans(0, p_vis, cols)
        for (a, b), block in zip(visual, self.gather_blocks(local, visual, recv, "update")):
            self._send_shared(block, plan, strategy, shared, a, b)
        text = spans(p_vis, width, cols)
        for (a, b), block in zip(text, self.gather_blocks(local, text, recv, "update")):
            self._send_personal(block, plan, strategy, personal, a - p_vis, b - p_vis)
        return Received(shared, personal, plan.excluded if plan is not None else None)

    # ------------------------------------------------------------------ one chunk
    def gather_blocks(self, local: torch.Tensor, chunks: list[tuple[int, int]], recv, tag: str):
        """Gathers chunk after chunk (columns a..b of every client); yields, on the server,
        (a, [K, b - a] host tensor) and None elsewhere. The consumer must be done with a
        block before asking for the next (they share one buffer)."""
        staged = None if self.server else HostChunks(local, chunks)
        for i, (a, b) in enumerate(chunks):
            c = b - a
            counts = [s * c for s in self.sizes]
            if not self.server:
                self.comm.gatherv(staged[i], counts, tag=tag, root=self.root)
                yield None
                continue
            block = recv[: self.num_clients * c].view(self.num_clients, c)
            # The server's own rows go straight to their place (the gather is in place).
            block[self.first:self.first + self.sizes[self.root]].copy_(local[:, a:b])
            self.comm.gatherv(None, counts, tag=tag, root=self.root, out=to_wire(block.reshape(-1)))
            yield a, block

    def _send_shared(self, got, plan, strategy, shared: torch.Tensor, a: int, b: int) -> None:
        rows = shared.shape[0]
        if self.server:
            out = mix_in_place(plan.shared, got[1], self.device,
                               finish=lambda m, col: strategy.finish("visual", m, a + col))
            wire = to_wire(out.reshape(-1))  # the block's first S rows: contiguous
        else:
            wire = to_wire(self.shared_in[: rows * (b - a)])
        self.comm.bcast(wire, tag="shared", root=self.root)
        shared[:, a:b] = from_wire(wire, shared.dtype).view(rows, b - a)

    def _send_personal(self, got, plan, strategy, personal: torch.Tensor, a: int, b: int) -> None:
        c = b - a
        counts = [s * c for s in self.sizes]
        if self.server:
            out = mix_in_place(plan.personal, got[1], self.device,
                               finish=lambda m, col: strategy.finish("text", m, a + col))
            self.comm.scatterv(to_wire(out.reshape(-1)), counts, None, tag="personal", root=self.root,
                               root_in_place=True)
            personal[:, a:b] = out[self.first:self.first + self.sizes[self.root]]
        else:
            got = self.comm.scatterv(None, counts, None, tag="personal", root=self.root,
                                     out=to_wire(self.personal_in[: counts[self.comm.rank]]))
            personal[:, a:b] = from_wire(got, personal.dtype).view(-1, c)
