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

from pilot_hpc.fl import aggregate, stack
from pilot_hpc.fl.flat import from_wire, to_wire
from pilot_hpc.fl.strategies.base import MixPlan
from pilot_hpc.fl.update import ClientUpdate, Part, Participation


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
    r, k = coef.shape
    if r > block.shape[0] or k > block.shape[0]:
        raise ValueError(f"mix_in_place: {r} output rows of {k} clients do not fit a block of {block.shape[0]} rows")
    work = aggregate.work_dtype(block.dtype)
    c = coef.to(device=device, dtype=work)
    step = sub_block(block, device)
    for a in range(0, block.shape[1], step):
        # The first K rows are the clients'; a block may have spare rows below them, room
        # for more output rows than senders (Pilot's T task rows from fewer participants).
        sub = block[:k, a:a + step].to(device=device, dtype=work, non_blocking=True)  # [K, s]
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
    shared: torch.Tensor  # [S, P_shared] host tensor: the broadcast rows (every rank)
    personal: torch.Tensor  # [n_sending_local, P_personal] host tensor: this rank's sending clients' rows
    excluded: list[int] | None  # on the server: clients that sent but were left out (non-finite update)
    # [P_personal] host tensor on every rank: the global personal row, when the aggregator's
    # personal rows are all one (Aggregator.global_personal) and some client did not send;
    # None otherwise (then every rank's senders have their rows and nobody else needs one).
    global_personal: torch.Tensor | None = None
    # The rows are mixed changes from the round's start (a lossy fl.codec, fl/coded.py),
    # which each client adds to its own round-start values; False: parameters.
    change: bool = False
    # fl.lora_rank_rule=stack: the round's stacked LoRA factors (every rank), which the
    # federation merges into the shared base (fl/stack.py); `personal` then has no columns.
    stacked: stack.Stacked | None = None


class Exchange:
    """One round's exchange between the clients' ranks and the server: given this rank's
    encoded updates (only those whose status sends), the aggregator and the round's
    participation mask, returns the shared rows and this rank's personal rows."""

    def run(self, aggregator, updates: list[ClientUpdate], widths: tuple[int, int], dtype: torch.dtype,
            selected: torch.Tensor, decode=None) -> Received:
        raise NotImplementedError


# Per sending client: (client id, sample count, Participation code).
META = 3


class StreamedExchange(Exchange):
    """Gatherv -> mix -> Bcast/Scatterv, chunk by chunk (module docstring). A client that
    was not selected has no row: its rank's counts leave it out, so it sends no bytes."""

    def __init__(self, comm, blocks: list[range], device: torch.device, chunk_mb: float, root: int = 0):
        self.comm, self.blocks, self.device, self.chunk_mb, self.root = comm, blocks, device, chunk_mb, root
        self.num_clients = sum(len(b) for b in blocks)
        self.server = comm.rank == root
        # Rows per rank and this rank's first row: every client's until run() knows the round's participants.
        self.sizes = [len(b) for b in blocks]
        self.first = blocks[comm.rank].start

    def run(self, aggregator, updates: list[ClientUpdate], widths: tuple[int, int], dtype: torch.dtype,
            selected: torch.Tensor, decode=None) -> Received:
        """updates: this rank's sending clients' updates, in client order (a non-finite one
        carries zero rows); widths: (P_shared, P_personal); dtype: the rows' wire dtype;
        selected [K] bool: the round's participants (the same on every rank); decode(part,
        block, cols): the server's transform chain on each gathered chunk."""
        comm, k_all = self.comm, self.num_clients
        p_shared, width = widths[0], widths[0] + widths[1]
        sel, k = self.begin_round(updates, selected)
        meta_all = self.gather_records(updates)
        local = self.stack_rows(updates, p_shared, width, dtype)
        cols = chunk_columns(self.chunk_mb, local.element_size(), width)
        # The server's window: one [k, c] receive buffer, reused by every chunk.
        recv = host_buffer(k * min(cols, max(width, 1)), dtype, self.device.type == "cuda") if self.server else None
        plan = gram = ids = acc = None
        if self.server:
            ids, n, good = self.senders(meta_all, k)
            if aggregator.needs_gram:
                gram = torch.zeros(k, k, dtype=torch.float64, device=self.device)
                # None: the flat rows' centred Gram below; else the aggregator's own (pilot.distance).
                acc = aggregator.gram_accumulator(k, self.device)
        if aggregator.needs_gram:  # pass 1 (ATA): the Gram matrix of the personal updates
            for block in self.gather_blocks(local, spans(p_shared, width, cols), recv, tag="gram"):
                if block is not None:
                    rows = self._decoded(decode, Part.PERSONAL, block[1], block[0] - p_shared)
                    if acc is not None:
                        acc.feed(rows, block[0] - p_shared)
                        continue
                    sent_good = good[ids]
                    gram_in_place(gram, rows, self.device, ref=int(sent_good.nonzero()[0]) if sent_good.any() else 0)
            if acc is not None:
                gram = acc.result()
        if self.server:
            plan = self.plan_for(aggregator, n, good, gram, ids, sel)
        shared = torch.empty(aggregator.shared_rows(), p_shared, dtype=dtype)
        stacking = aggregator.stacks_lora
        personal = torch.empty(self.sizes[comm.rank], 0 if stacking else width - p_shared, dtype=dtype)
        # Only when someone sat out: with every client sending, the bytes are as before.
        spread = (torch.empty(width - p_shared, dtype=dtype)
                  if aggregator.global_personal and k < k_all and not stacking else None)
        if not self.server:  # receive buffers, reused by every chunk (fresh ones per chunk
            # grew the clients' resident memory by ~1 GB per 7B exchange, measured)
            self.shared_in = host_buffer(shared.shape[0] * min(cols, max(p_shared, 1)), dtype, False)
            self.personal_in = host_buffer(personal.shape[0] * min(cols, max(width - p_shared, 1)), dtype, False)
        part_cols = spans(0, p_shared, cols)
        for (a, b), block in zip(part_cols, self.gather_blocks(local, part_cols, recv, "update")):
            if block is not None:
                block = (a, self._decoded(decode, Part.SHARED_BY_TASK, block[1], a))
            self._send_shared(block, plan, aggregator, shared, a, b)
        part_cols = spans(p_shared, width, cols)
        if stacking:
            got = self.stack_personal(local, part_cols, recv, decode, p_shared, plan, aggregator, ids)
            return Received(shared, personal, plan.excluded if plan is not None else None, None, stacked=got)
        for (a, b), block in zip(part_cols, self.gather_blocks(local, part_cols, recv, "update")):
            if block is not None:
                block = (a, self._decoded(decode, Part.PERSONAL, block[1], a - p_shared))
            self._send_personal(block, plan, aggregator, personal, a - p_shared, b - p_shared, spread)
        return Received(shared, personal, plan.excluded if plan is not None else None, spread)

    def stack_personal(self, local, part_cols, recv, decode, p_shared: int, plan, aggregator,
                       ids) -> stack.Stacked:
        """fl.lora_rank_rule=stack: the personal chunks gathered as for a mix, but packed
        module by module into the stacked factors (fl/stack.py), which go to every rank in
        one broadcast; nothing is scattered back (each participant restarts its B at zero).
        The server holds one module's factors of the K senders at a time, plus the packed
        result (sum r_k (in + out) values per module)."""
        packer = None
        if self.server:  # the plan's personal rows are the FedAvg weights of the senders (all rows alike)
            packer = stack.StackedFactors(aggregator.spans, ids, plan.personal[0], aggregator.ranks, self.device)
        for block in self.gather_blocks(local, part_cols, recv, "update"):
            if block is not None:
                packer.feed(self._decoded(decode, Part.PERSONAL, block[1], block[0] - p_shared), block[0] - p_shared)
        return stack.broadcast(self.comm, packer.result() if packer is not None else None, aggregator.spans,
                               aggregator.ranks, self.num_clients, root=self.root)

    def begin_round(self, updates: list[ClientUpdate], selected: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The round's rows per rank (its selected clients: every rank knows them without a
        message) and this rank's first row; (selected as a CPU bool mask, K sending)."""
        sel = selected.cpu().bool()
        self.sizes = [int(sel[b.start:b.stop].sum()) for b in self.blocks]
        self.first = sum(self.sizes[:self.comm.rank])
        if len(updates) != self.sizes[self.comm.rank]:
            raise RuntimeError(f"rank {self.comm.rank}: {len(updates)} updates to send but "
                               f"{self.sizes[self.comm.rank]} of its clients are selected this round")
        return sel, sum(self.sizes)

    def stack_rows(self, updates: list[ClientUpdate], split: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[n_sending, width] on the model's device: each update's shared part in columns
        :split, its personal part after. Each update's rows are released once copied, so a
        rank holds its rows about once, not twice."""
        local = torch.zeros(len(updates), width, dtype=dtype, device=self.device)
        for i, u in enumerate(updates):
            local[i, :split] = u.parts[Part.SHARED_BY_TASK]
            local[i, split:] = u.parts[Part.PERSONAL]
            u.parts.clear()
        return local

    def gather_records(self, updates: list[ClientUpdate]) -> np.ndarray | None:
        """Each sending client's (client, samples, Participation code) record, gathered on
        the server (None elsewhere)."""
        meta = np.array([[u.client, u.num_samples, u.status.code] for u in updates], dtype=np.int64).reshape(-1, META)
        return self.comm.gatherv(np.ascontiguousarray(meta).reshape(-1), [META * s for s in self.sizes],
                                 tag="num_samples", root=self.root, fast=False)

    def plan_for(self, aggregator, n: torch.Tensor, good: torch.Tensor, gram: torch.Tensor | None,
                 ids: torch.Tensor, sel: torch.Tensor) -> MixPlan:
        """The aggregator's plan over the rows that travel (every client when all take part):
        the senders' Gram put in place in the K x K one, the coefficients restricted to the senders."""
        full = None
        if gram is not None:
            full = torch.zeros(self.num_clients, self.num_clients, dtype=torch.float64)
            full[ids[:, None], ids[None, :]] = gram.cpu()
        plan = aggregator.plan(n, good, full)
        return MixPlan(shared=plan.shared[:, ids], personal=plan.personal[ids][:, ids],
                       excluded=[c for c in plan.excluded if bool(sel[c])])

    def senders(self, meta_all: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On the server, from the gathered (client, samples, status) records of the K
        sending clients: their ids [K], and the sample counts and good flags [K_all]."""
        got = torch.from_numpy(meta_all.reshape(k, META))
        ids = got[:, 0]
        n = torch.zeros(self.num_clients, dtype=torch.int64)
        n[ids] = got[:, 1]
        good = torch.zeros(self.num_clients, dtype=torch.bool)
        good[ids] = got[:, 2] == Participation.PARTICIPATED.code
        return ids, n, good

    @staticmethod
    def _decoded(decode, part: Part, block: torch.Tensor, a: int) -> torch.Tensor:
        return block if decode is None else decode(part, block, (a, a + block.shape[1]))

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
            rows = sum(self.sizes)  # the sending clients
            block = recv[: rows * c].view(rows, c)
            # The server's own rows go straight to their place (the gather is in place).
            block[self.first:self.first + self.sizes[self.root]].copy_(local[:, a:b])
            self.comm.gatherv(None, counts, tag=tag, root=self.root, out=to_wire(block.reshape(-1)))
            yield a, block

    def _send_shared(self, got, plan, aggregator, shared: torch.Tensor, a: int, b: int) -> None:
        rows = shared.shape[0]
        if self.server:
            block = got[1]
            if rows > block.shape[0]:
                # Fewer senders than shared rows (Pilot's T task rows, few participants): the
                # mix needs room below the clients' rows, here a padded copy of the chunk.
                block = torch.cat([block, block.new_zeros(rows - block.shape[0], block.shape[1])])
            out = mix_in_place(plan.shared, block, self.device,
                               finish=lambda m, col: aggregator.finish(Part.SHARED_BY_TASK, m, a + col))
            wire = to_wire(out.reshape(-1))  # the block's first S rows: contiguous
        else:
            wire = to_wire(self.shared_in[: rows * (b - a)])
        self.comm.bcast(wire, tag="shared", root=self.root)
        shared[:, a:b] = from_wire(wire, shared.dtype).view(rows, b - a)

    def _send_personal(self, got, plan, aggregator, personal: torch.Tensor, a: int, b: int,
                       spread: torch.Tensor | None = None) -> None:
        """Row k of the mixed chunk to client k's rank; with `spread`, also the global row
        (every row is the same: the first) to every rank, received into spread[a:b]."""
        c = b - a
        counts = [s * c for s in self.sizes]
        if spread is not None:
            if self.server:
                out = mix_in_place(plan.personal, got[1], self.device,
                                   finish=lambda m, col: aggregator.finish(Part.PERSONAL, m, a + col))
                got = (got[0], None, out)
                wire = to_wire(out[0].contiguous())
            else:
                wire = to_wire(torch.empty(c, dtype=personal.dtype))
            self.comm.bcast(wire, tag="personal_global", root=self.root)
            spread[a:b] = from_wire(wire, personal.dtype)
        if self.server:
            out = got[2] if spread is not None else mix_in_place(
                plan.personal, got[1], self.device, finish=lambda m, col: aggregator.finish(Part.PERSONAL, m, a + col))
            self.comm.scatterv(to_wire(out.reshape(-1)), counts, None, tag="personal", root=self.root,
                               root_in_place=True)
            personal[:, a:b] = out[self.first:self.first + self.sizes[self.root]]
        else:
            got = self.comm.scatterv(None, counts, None, tag="personal", root=self.root,
                                     out=to_wire(self.personal_in[: counts[self.comm.rank]]))
            personal[:, a:b] = from_wire(got, personal.dtype).view(-1, c)
