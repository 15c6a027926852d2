"""The encoded exchange: what a lossy or asymmetric fl.codec puts on the wire.

The plain exchange (fl/stream.py) moves [K, c] column chunks of one float dtype and
mixes them as they are. Here each client's update is the change from its round's start
plus its error-feedback residual, already encoded to bytes (transforms.Codec), and:

    Gatherv [K, bytes of c columns] -> decode to float32 [K, c] -> mix (the strategy's plan)
        -> encode with fl.codec_down -> Bcast (shared rows) / Scatterv (row k to client k)
        -> every rank, the server included, decodes the same bytes

Chunks are multiples of codecs.BLOCK columns, so a column chunk is one contiguous byte
span of every encoded row (codecs.span) and no value is encoded twice. Each part is
encoded on its own. The server holds one [K, bytes] receive buffer and one [max(K, S), c]
float32 buffer (S: the shared rows). What comes back are mixed changes (Received.change):
each client adds them to its own round-start values of what each row installs into
(`install_rows`, ClientPolicy.install_start). With rows that sum to 1 this is the
parameter mix whenever the row's contributors started from the same values (docs/method.md,
"Compressed updates").
"""

from __future__ import annotations

import torch

from pilot_hpc.fl.codecs import BLOCK, decode_rows, encode_rows, nbytes, span
from pilot_hpc.fl.flat import flatten, from_wire, to_wire
from pilot_hpc.fl.stream import (Received, StreamedExchange, chunk_columns, gram_in_place, host_buffer,
                                 mix_in_place, spans)
from pilot_hpc.fl.transforms import coded
from pilot_hpc.fl.update import Part


def coded_columns(chunk_mb: float, widths: tuple[int, int]) -> int:
    """Columns per chunk: chunk_mb MiB of float32 values (what the server decodes into;
    0: each part whole), a multiple of BLOCK so that a chunk starts a block."""
    if chunk_mb <= 0:
        return max(max(widths), 1)
    cols = chunk_columns(chunk_mb, 4, sum(widths))
    return max(BLOCK, cols - cols % BLOCK)


def round_bytes(up: str, down: str, widths: tuple[int, int], shared_rows: int, personal_passes: int) -> dict:
    """One client's bytes in a round, sent and received, and the same in float32: its
    encoded row (the personal part once more for ATA's Gram pass) up; every shared row
    and its own personal row down."""
    p_shared, p_personal = widths
    return {"up": nbytes(up, p_shared) + personal_passes * nbytes(up, p_personal),
            "down": shared_rows * nbytes(down, p_shared) + nbytes(down, p_personal),
            "up_float32": 4 * (p_shared + personal_passes * p_personal),
            "down_float32": 4 * (shared_rows * p_shared + p_personal)}


class CodedExchange(StreamedExchange):
    """StreamedExchange's rounds (participation, plan, chunking, in-place gathers) with
    encoded rows: up with fl.codec, back with fl.codec_down."""

    def __init__(self, comm, blocks: list[range], device: torch.device, chunk_mb: float, up: str, down: str,
                 root: int = 0):
        super().__init__(comm, blocks, device, chunk_mb, root)
        self.up, self.down = up, down
        self.bytes: dict | None = None  # the last round's round_bytes (every rank)

    def run(self, aggregator, updates, widths, dtype, selected, decode=None) -> Received:
        """As StreamedExchange.run, the updates' parts being uint8 rows of encoded changes;
        `dtype` is not used (the server mixes float32, the clients receive float32)."""
        comm, k_all = self.comm, self.num_clients
        p_shared, p_personal = widths
        sel, k = self.begin_round(updates, selected)
        meta_all = self.gather_records(updates)
        enc_shared = nbytes(self.up, p_shared)
        local = self.stack_rows(updates, enc_shared, enc_shared + nbytes(self.up, p_personal), torch.uint8)
        cols = coded_columns(self.chunk_mb, widths)
        rows_out = aggregator.shared_rows()
        widest = min(cols, max(p_shared, p_personal, 1))
        pinned = self.device.type == "cuda"
        if self.server:
            self.recv = host_buffer(k * nbytes(self.up, widest), torch.uint8, pinned)
            self.values = host_buffer(max(k, rows_out) * widest, torch.float32, pinned)
        else:
            self.shared_in = host_buffer(rows_out * nbytes(self.down, widest), torch.uint8, False)
            self.personal_in = host_buffer(self.sizes[comm.rank] * nbytes(self.down, widest), torch.uint8, False)
        shared_cols, personal_cols = spans(0, p_shared, cols), spans(0, p_personal, cols)

        def chunks(offset, col_spans):  # the byte spans of the column spans of a part
            return [(offset + lo, offset + hi) for lo, hi in (span(self.up, a, b) for a, b in col_spans)]

        plan = gram = ids = good = None
        if self.server:
            ids, n, good = self.senders(meta_all, k)
            if aggregator.needs_gram:
                gram = torch.zeros(k, k, dtype=torch.float64, device=self.device)
        if aggregator.needs_gram:  # pass 1 (ATA): the Gram matrix of the decoded personal changes
            for (a, b), got in zip(personal_cols, self.gather_blocks(local, chunks(enc_shared, personal_cols),
                                                                      self.recv if self.server else None, "gram")):
                if got is not None:
                    rows = self._decoded(got[1], Part.PERSONAL, a, b, k, decode)[:k]
                    sent_good = good[ids]
                    gram_in_place(gram, rows, self.device, ref=int(sent_good.nonzero()[0]) if sent_good.any() else 0)
        if self.server:
            plan = self.plan_for(aggregator, n, good, gram, ids, sel)
        shared = torch.empty(rows_out, p_shared, dtype=torch.float32)
        personal = torch.empty(self.sizes[comm.rank], p_personal, dtype=torch.float32)
        spread = torch.empty(p_personal, dtype=torch.float32) if aggregator.global_personal and k < k_all else None
        for (a, b), got in zip(shared_cols, self.gather_blocks(local, chunks(0, shared_cols),
                                                                self.recv if self.server else None, "update")):
            block = None if got is None else self._decoded(got[1], Part.SHARED_BY_TASK, a, b, max(k, rows_out), decode)
            self._down_shared(block, plan, aggregator, shared, a, b)
        for (a, b), got in zip(personal_cols, self.gather_blocks(local, chunks(enc_shared, personal_cols),
                                                                  self.recv if self.server else None, "update")):
            block = None if got is None else self._decoded(got[1], Part.PERSONAL, a, b, k, decode)
            self._down_personal(block, plan, aggregator, personal, a, b, spread)
        self.bytes = round_bytes(self.up, self.down, widths, rows_out, 2 if aggregator.needs_gram else 1)
        return Received(shared, personal, plan.excluded if plan is not None else None, spread, change=True)

    def _decoded(self, raw: torch.Tensor, part: Part, a: int, b: int, rows: int, decode) -> torch.Tensor:
        """The server's float32 [rows, b - a] block: the K senders' decoded chunk on top
        (then the chain's decode), room below for output rows (Pilot's T task rows)."""
        c, k = b - a, raw.shape[0]
        block = self.values[: rows * c].view(rows, c)
        decode_rows(raw, self.up, c, out=block[:k])
        if decode is not None:
            block[:k] = decode(part, block[:k], (a, b))
        return block

    def _down_shared(self, block, plan, aggregator, shared: torch.Tensor, a: int, b: int) -> None:
        rows, c = shared.shape[0], b - a
        size = nbytes(self.down, c)
        if self.server:
            out = mix_in_place(plan.shared, block, self.device,
                               finish=lambda m, col: aggregator.finish(Part.SHARED_BY_TASK, m, a + col))
            wire = to_wire(encode_rows(out.cpu(), self.down, "the mixed shared rows", nan_rows=True).reshape(-1))
        else:
            wire = to_wire(self.shared_in[: rows * size])
        self.comm.bcast(wire, tag="shared", root=self.root)
        decode_rows(from_wire(wire, torch.uint8).view(rows, size), self.down, c, out=shared[:, a:b])

    def _down_personal(self, block, plan, aggregator, personal: torch.Tensor, a: int, b: int,
                       spread: torch.Tensor | None) -> None:
        c = b - a
        size = nbytes(self.down, c)
        counts = [s * size for s in self.sizes]
        enc = None
        if self.server:
            out = mix_in_place(plan.personal, block, self.device,
                               finish=lambda m, col: aggregator.finish(Part.PERSONAL, m, a + col))
            enc = encode_rows(out.cpu(), self.down, "the mixed personal rows", nan_rows=True)
        if spread is not None:  # every personal row is the global one: the first, to every rank
            wire = to_wire(enc[0].contiguous()) if self.server else to_wire(torch.empty(size, dtype=torch.uint8))
            self.comm.bcast(wire, tag="personal_global", root=self.root)
            spread[a:b] = decode_rows(from_wire(wire, torch.uint8), self.down, c)
        if self.server:
            self.comm.scatterv(to_wire(enc.reshape(-1)), counts, None, tag="personal", root=self.root,
                               root_in_place=True)
            mine = enc[self.first:self.first + self.sizes[self.root]]
            if len(mine):
                decode_rows(mine, self.down, c, out=personal[:, a:b])
        else:
            got = self.comm.scatterv(None, counts, None, tag="personal", root=self.root,
                                     out=to_wire(self.personal_in[: counts[self.comm.rank]]))
            if counts[self.comm.rank]:
                decode_rows(from_wire(got, torch.uint8).view(-1, size), self.down, c, out=personal[:, a:b])


def exchange_for(cfg, comm, blocks: list[range], device: torch.device) -> StreamedExchange:
    """The run's exchange: the plain one, or the encoded one when the codecs need it (the
    aggregators then see mixed changes: Aggregator.mixes_changes)."""
    if not coded(cfg):
        return StreamedExchange(comm, blocks, device, cfg.fl.chunk_mb)
    up, down = cfg.fl.codecs()
    return CodedExchange(comm, blocks, device, cfg.fl.chunk_mb, up, down)


def install_rows(policy, pm, got: Received, personal: torch.Tensor | None, start: dict, now: dict):
    """(shared rows, personal row) for policy.install on the hosted client. Mixed changes
    (got.change) become parameters: the client's values at `start` (its round-start
    state) of what each row installs into, plus the change; `now` is put back into the
    model afterwards. A NaN row (no answer) stays NaN. Plain rows pass as they are."""
    if not got.change:
        return got.shared, personal
    if start is not now:
        pm.set_state(start)
    base = policy.install_start(pm, got.shared.shape[0]).detach().float().cpu()
    own = flatten(policy.personal_params(pm)).float().cpu() if personal is not None else None
    if start is not now:
        pm.set_state(now)
    return base + got.shared, None if personal is None else own + personal


def round_entry(exchanger) -> dict:
    """The round's entry in metrics.json gets "bytes" (one client's round_bytes and the
    compression ratios vs float32) from an encoded exchange; {} from the plain one (its
    documents stay as they were)."""
    got = getattr(exchanger, "bytes", None)
    if got is None:
        return {}
    return {"bytes": {**got, "ratio_up": round(got["up_float32"] / max(got["up"], 1), 4),
                      "ratio_down": round(got["down_float32"] / max(got["down"], 1), 4)}}


def log_suffix(exchanger) -> str:
    entry = round_entry(exchanger).get("bytes")
    if entry is None:
        return ""
    return (f" | bytes/client up {entry['up'] / 2**20:.3f} MiB ({entry['ratio_up']:.2f}x fewer than float32), "
            f"down {entry['down'] / 2**20:.3f} MiB ({entry['ratio_down']:.2f}x)")
