"""Secure aggregation (privacy.secure_aggregation): the server learns the weighted sum of
the round's updates and nothing else about any one of them.

For aggregators whose server step needs only that sum (FedAvgServer and its kin: every
row of the plan is one weighted mean), each good participant k sends, instead of its
float row x_k,

    y_k = round(w_k * x_k * 2^F) + sum_{j > k} mask(k, j) - sum_{j < k} mask(j, k)   (mod 2^64)

with w_k its public weight (the plan's, from the sample counts that every rank knows)
and the masks shared pairwise among the round's good participants only (fl/masks.py).
Summed over them, the masks cancel exactly in the ring Z / 2^64 (uint64 arithmetic), and
the sum, read as a signed integer times 2^-F, is the weighted mean to within the
quantisation bound (`decode_fixed`). A single y_k is a uniformly random word to anyone
who lacks its pair keys.

Who is good is settled before any masking: the round's selection is known everywhere
(fl/participation.py), each rank adds its clients' flags (finite, and within the ring's
range) to the (client, samples, status) records that rank 0 already gathers, and rank 0
relays every record to every rank. So every mask has its partner in the sum, and an
excluded client sends zeros (weight 0, no mask). What is not handled: a client that
fails after masking (SecAgg+'s secret-shared mask recovery is not implemented); the
round then aborts like any collective with a dead rank.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pilot_hpc.config import ConfigError
from pilot_hpc.fl import masks
from pilot_hpc.fl.flat import from_wire, to_wire
from pilot_hpc.fl.stream import META, Received, StreamedExchange, chunk_columns, spans
from pilot_hpc.fl.transforms import Transform
from pilot_hpc.fl.update import PARTS, ClientUpdate, Part, Participation

log = logging.getLogger("pilot_hpc.fl")

# Fraction bits of the fixed point: one unit is 2^-40 ~ 9.1e-13, and rounding costs at
# most half a unit per client and coordinate. The ring's signed range then holds values
# up to 2^(63 - 40): LIMIT keeps every |x| at 2^22 ~ 4.2e6 or less, so each term
# |w_k x_k| 2^F <= 2^62 fits an int64 and the weighted mean (|.| <= max |x_k|, the
# weights summing to 1) plus K half-units of rounding stays below 2^63.
FRACTION_BITS = 40
LIMIT = float(2 ** (62 - FRACTION_BITS))


def quantisation_bound(senders: int, fraction_bits: int = FRACTION_BITS) -> float:
    """|decode(sum) - sum_k w_k x_k| <= senders * 2^-(F+1) per coordinate from rounding
    each term, plus float64 rounding (relative 2^-52 of sum |w_k x_k|, far below) and the
    final rounding to the result's dtype (half an ulp of the result)."""
    return senders * 2.0 ** -(fraction_bits + 1)


def encode_fixed(row: torch.Tensor, weight: float, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """round(weight * row * 2^F) as ring elements -> [c] uint64 (two's complement)."""
    # weight * 2^F is exact (a power of two), so this is round(fl(weight * row) * 2^F); a
    # multiplication, where np.ldexp took 0.7 s for 4M values on the dev machine (0.1 s).
    scaled = row.detach().to(device="cpu", dtype=torch.float64).numpy() * (weight * 2.0 ** fraction_bits)
    return np.rint(scaled, out=scaled).astype(np.int64).view(np.uint64)


def ring_sum(block: np.ndarray) -> np.ndarray:
    """[K, c] uint64 -> [c] uint64: the column sums modulo 2^64 (numpy's unsigned sums wrap)."""
    return block.sum(axis=0, dtype=np.uint64)


def decode_fixed(total: np.ndarray, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """Ring elements as signed fixed-point numbers -> [c] float64."""
    return total.view(np.int64).astype(np.float64) * 2.0 ** -fraction_bits


def in_range(update: ClientUpdate) -> bool:
    """Every value of the update within the ring's range (|x| <= LIMIT): a finite update
    beyond it would wrap around; it is excluded like a non-finite one."""
    return all(u.numel() == 0 or float(u.abs().max()) <= LIMIT for u in update.parts.values())


def check_chain(chain) -> None:
    """The server sees only the masked sum, so it cannot run a transform's per-client
    decode: only transforms that leave decode as it is (encode-only ones: clipping, client
    noise) can go with secure aggregation."""
    decoding = [t.name for t in chain.transforms if type(t).decode is not Transform.decode]
    if decoding:
        raise ConfigError(f"privacy.secure_aggregation: transform(s) {decoding} in fl.transforms decode each "
                          "client's chunk on the server, but under secure aggregation the server only ever sees "
                          "the masked sum; remove them from fl.transforms or set privacy.secure_aggregation=false")


class SecureSumExchange(StreamedExchange):
    """The round's weighted sum through pairwise masks (module docstring): gather of the
    masked int64 chunks to rank 0, their sum in the ring, decoded to float, the
    aggregator's element-wise step (FedAdam's), then one Bcast of the result, which is
    the shared row and every client's personal row (a global model). Chunked like the
    streamed exchange (fl.chunk_mb); being an exact integer sum, the result does not
    depend on the number of ranks, the chunk size or the order of the clients."""

    def __init__(self, comm, blocks: list[range], device: torch.device, chunk_mb: float, seed: int,
                 root: int = 0):
        super().__init__(comm, blocks, device, chunk_mb, root)
        self.seed = seed
        mine = blocks[comm.rank]
        # This rank's clients' private keys (a deployment: each on its own client).
        self.private = {c: masks.private_key(seed, c) for c in mine}
        self.public: list[bytes] | None = None  # every client's public key, once relayed

    # ------------------------------------------------------------------ control
    def share_public_keys(self) -> list[bytes]:
        """Every client's public key, gathered to rank 0 and relayed to every rank (once)."""
        if self.public is None:
            mine = np.frombuffer(b"".join(masks.public_bytes(self.private[c]) for c in sorted(self.private)),
                                 dtype=np.uint8).copy()
            counts = [len(b) * masks.KEY_BYTES for b in self.blocks]
            got = self.comm.gatherv(mine, counts, tag="secagg_keys", root=self.root, fast=False)
            relay = got if self.server else np.empty(sum(counts), dtype=np.uint8)
            self.comm.bcast(relay, tag="secagg_keys", root=self.root)
            raw = relay.tobytes()
            self.public = [raw[i:i + masks.KEY_BYTES] for i in range(0, len(raw), masks.KEY_BYTES)]
        return self.public

    def share_records(self, updates: list[ClientUpdate], sel: torch.Tensor):
        """(n [K], good [K]) on every rank: each sending client's (id, samples, status),
        a client out of the ring's range marked non-finite, to rank 0 and back."""
        records = []
        for u in updates:
            status = u.status
            if status is Participation.PARTICIPATED and not in_range(u):
                log.warning("client %d: an update value exceeds %g in round %d, beyond secure aggregation's "
                            "fixed-point range: excluded from the sum", u.client, LIMIT, u.round)
                status = Participation.EXCLUDED_NONFINITE
            records.append([u.client, u.num_samples, status.code])
        meta = np.array(records, dtype=np.int64).reshape(-1)
        counts = [META * s for s in self.sizes]
        got = self.comm.gatherv(meta, counts, tag="num_samples", root=self.root, fast=False)
        relay = got if self.server else np.empty(sum(counts), dtype=np.int64)
        self.comm.bcast(relay, tag="secagg_records", root=self.root)
        ids, n, good = self.senders(relay, len(relay) // META)
        if not bool(sel[ids].all()) or len(ids) != int(sel.sum()):
            raise RuntimeError(f"secure aggregation: the senders {ids.tolist()} are not the round's selection")
        return n, good

    @staticmethod
    def weights(aggregator, n: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
        """[K] float64: the public weight of each client (0 for the bad ones), the plan's one
        row; refused for a plan that is not one weighted sum."""
        plan = aggregator.plan(n, good, None)
        w = plan.shared[0]
        if plan.shared.shape[0] != 1 or not torch.equal(plan.personal, w[None, :].expand_as(plan.personal)):
            raise RuntimeError(f"secure aggregation needs a server step that is one weighted sum; "
                               f"{type(aggregator).__name__}'s plan is not")
        return w

    # ------------------------------------------------------------------ the round
    def run(self, aggregator, updates: list[ClientUpdate], widths: tuple[int, int], dtype: torch.dtype,
            selected: torch.Tensor, decode=None) -> Received:
        """As StreamedExchange.run; `decode` is not called (check_chain refused any
        transform that decodes)."""
        if aggregator.needs_gram or not aggregator.global_personal:
            raise RuntimeError(f"secure aggregation: {type(aggregator).__name__} needs the individual updates")
        k_all = self.num_clients
        p_shared, width = widths[0], widths[0] + widths[1]
        if width > masks.MAX_COLUMNS:
            raise RuntimeError(f"secure aggregation: a row of {width} values exceeds one mask stream "
                               f"({masks.MAX_COLUMNS})")
        sel, k = self.begin_round(updates, selected)
        public = self.share_public_keys()
        n, good = self.share_records(updates, sel)
        senders = good.nonzero().flatten().tolist()
        if self.server and len(senders) == 1:
            log.warning("one good participant this round (client %d): the sum is its own update, which secure "
                        "aggregation cannot hide", senders[0])
        w = self.weights(aggregator, n, good) if senders else None
        # Pair keys of this rank's good senders, per peer: one key agreement per pair and round.
        keys = {u.client: {j: masks.pair_key(self.private[u.client], public[j], u.round, u.client, j)
                           for j in senders if j != u.client}
                for u in updates if u.client in senders}
        result = torch.full((width,), float("nan"), dtype=dtype)  # NaN: no answer (nobody good)
        if senders:
            cols = chunk_columns(self.chunk_mb, np.dtype(np.uint64).itemsize, width)
            for part, (lo, hi) in zip(PARTS, ((0, p_shared), (p_shared, width))):
                for a, b in spans(lo, hi, cols):
                    rows = self.masked_chunk(updates, keys, w, part, lo, a, b)
                    total = self.gather_sum(rows, k, a, b)
                    self.finish_and_share(aggregator, part, total, result, lo, a, b, dtype)
        for u in updates:
            u.parts.clear()
        shared = result[None, :p_shared].clone()  # [1, P_shared]
        personal = result[p_shared:]
        return Received(shared=shared, personal=personal[None, :].expand(len(updates), -1).clone(),
                        excluded=[c for c in sel.nonzero().flatten().tolist() if not bool(good[c])]
                        if self.server else None,
                        global_personal=personal.clone() if k < k_all else None)

    @staticmethod
    def masked_chunk(updates: list[ClientUpdate], keys: dict, w: torch.Tensor, part: Part, lo: int, a: int,
                     b: int) -> np.ndarray:
        """[n_sending_local, b - a] uint64: columns a..b of the row [shared | personal]
        (inside `part`, which starts at column lo) of each of this rank's sending clients,
        weighted, in fixed point and masked; zeros for an excluded client."""
        rows = np.zeros((len(updates), b - a), dtype=np.uint64)
        for i, u in enumerate(updates):
            if u.client in keys:
                rows[i] = encode_fixed(u.parts[part].reshape(-1)[a - lo:b - lo], float(w[u.client])) + \
                    masks.client_mask(keys[u.client], u.client, a, b - a)
        return rows

    def gather_sum(self, rows: np.ndarray, k: int, a: int, b: int) -> np.ndarray | None:
        """The masked chunks of every sending client to rank 0 -> their ring sum there
        (None elsewhere)."""
        c = b - a
        counts = [s * c for s in self.sizes]
        if not self.server:
            self.comm.gatherv(np.ascontiguousarray(rows).reshape(-1), counts, tag="update", root=self.root)
            return None
        block = np.empty((k, c), dtype=np.uint64)
        block[self.first:self.first + self.sizes[self.root]] = rows
        self.comm.gatherv(None, counts, tag="update", root=self.root, out=block.reshape(-1))
        return self.sum_block(block, a)

    def sum_block(self, block: np.ndarray, a: int) -> np.ndarray:
        """[K, c] masked chunk (columns a.. of the row) -> its ring sum: every row the
        server ever holds is one of these."""
        return ring_sum(block)

    def finish_and_share(self, aggregator, part: Part, total: np.ndarray | None, result: torch.Tensor, lo: int,
                         a: int, b: int, dtype: torch.dtype) -> None:
        """Rank 0 decodes the sum and applies the aggregator's element-wise step; the
        result goes to every rank (result[a:b])."""
        if self.server:
            mixed = torch.from_numpy(decode_fixed(total)).to(dtype)[None, :]  # [1, c]
            aggregator.finish(part, mixed, a - lo)
            wire = to_wire(mixed[0].contiguous())
        else:
            wire = to_wire(torch.empty(b - a, dtype=dtype))
        self.comm.bcast(wire, tag="secagg_result", root=self.root)
        result[a:b] = from_wire(wire, dtype)
