"""Run under `mpiexec -n W`: secure aggregation (fl/secagg.py) against the plain weighted
sum, on updates that every rank regenerates from a seed (as stream_check.py does).

Per case: the result equals the exact (float64) weighted sum of the good updates within
the fixed-point bound plus the final rounding, and plain FedAvg's one-shot aggregation
within that and its own float32 error; a client excluded before masking (non-finite, or
beyond the ring's range) and the clients that sit the round out leave a correct sum; the
result is bitwise the same with the row sent whole, and with W = 1 (rank 0 alone, on a
communicator of its own); what rank 0 receives of each client is uniform in the ring.
Exits 0 when every case passes on every rank.
"""

import sys

import numpy as np
import torch

from pilot_hpc.config import load_config
from pilot_hpc.fl.comm import Comm, block_ranges
from pilot_hpc.fl.secagg import SecureSumExchange, quantisation_bound
from pilot_hpc.fl.strategies import get_strategy
from pilot_hpc.fl.update import ClientUpdate, Part, Participation

# (name, overrides, K, P_shared, P_personal, dtype, bad, chunk columns (0: whole), not selected, out of range)
CASES = [
    ("fedavg-chunked-bad", ["fl.strategy=fedavg"], 5, 13, 29, torch.float32, [1], 7, (), ()),
    ("fedprox-bf16-whole", ["fl.strategy=fedprox"], 4, 9, 17, torch.bfloat16, [], 0, (), ()),
    ("shepherd-no-shared-part", ["fl.strategy=shepherd"], 4, 0, 23, torch.float32, [], 5, (), ()),
    ("fedavg-out-of-range", ["fl.strategy=fedavg"], 4, 8, 12, torch.float32, [], 5, (), (3,)),
    # K = 2: under mpiexec -n 3 the server hosts no client.
    ("fedavg-server-hosts-none", ["fl.strategy=fedavg"], 2, 6, 10, torch.float32, [], 4, (), ()),
    # The last clients sit out (under -n 3 the whole last rank): the global row is spread.
    ("feddpa-not-selected-bad", ["fl.strategy=feddpa"], 6, 10, 21, torch.float32, [0], 8, (4, 5), ()),
    ("fedadam-two-rounds", ["fl.strategy=fedadam", "fedadam.server_lr=0.1"], 6, 11, 19, torch.float32, [2], 6,
     (1,), ()),
]

# Thresholds of the uniformity check (scipy 1.17): chi2.ppf(0.999, 255) for the 256 bins
# of the top byte, kstwo.ppf(0.999, 16384) for Kolmogorov-Smirnov over 16384 words.
CHI2_255_999 = 330.52
KS_16384_999 = 0.01522


class Recording(SecureSumExchange):
    """Keeps every masked block the server receives (the only rows it ever holds)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocks_seen = []

    def sum_block(self, block, a):
        self.blocks_seen.append((a, block.copy()))
        return super().sum_block(block, a)


def config(overrides, k):
    client_tasks = (["vqa", "caption", "grounding"] * k)[:k]
    used = {t: m for t, m in {"vqa": "vqa_accuracy", "caption": "cider", "grounding": "iou@0.5"}.items()
            if t in client_tasks}
    return load_config(None, ["pilot.top_m=1", "privacy.secure_aggregation=true"] + overrides +
                       [f"fl.num_clients={k}", f"fl.client_tasks={client_tasks}", f"fl.task_metrics={used}"])


def updates_of(clients, x, n, p_vis, bad, huge, round_):
    out = []
    for c in clients:
        row = torch.zeros_like(x[c]) if c in bad else x[c].clone()
        if c in huge:
            row[-1] = 1e7  # finite, beyond 2^22: would wrap around the ring
        out.append(ClientUpdate(client=c, num_samples=int(n[c]), round=round_,
                                parts={Part.SHARED_BY_TASK: row[:p_vis], Part.PERSONAL: row[p_vis:]},
                                status=Participation.EXCLUDED_NONFINITE if c in bad else Participation.PARTICIPATED))
    return out


def run_case(comm, solo, name, overrides, k, p_vis, p_txt, dtype, bad, cols, skipped, huge) -> None:
    cfg = config(overrides, k)
    blocks = block_ranges(k, comm.size)
    mine = blocks[comm.rank]
    chunk_mb = cols * 8 / 2 ** 20  # the masked rows travel as 8-byte words
    secure, reference = get_strategy(cfg.fl.strategy, cfg).aggregator, get_strategy(cfg.fl.strategy, cfg).aggregator
    gen = torch.Generator().manual_seed(len(name))
    init = {Part.SHARED_BY_TASK: torch.randn(p_vis, generator=gen), Part.PERSONAL: torch.randn(p_txt, generator=gen)}
    secure.init_server(init)
    reference.init_server(init)
    selected = torch.ones(k, dtype=torch.bool)
    selected[list(skipped)] = False
    good = selected.clone()
    good[list(bad) + list(huge)] = False
    exchange = SecureSumExchange(comm, blocks, torch.device("cpu"), chunk_mb, seed=cfg.run.seed)
    for round_ in range(1, 3 if name.startswith("fedadam") else 2):
        x = torch.randn(k, p_vis + p_txt, generator=gen).to(dtype)
        n = torch.randint(3, 20, (k,), generator=gen)
        mine_sent = [c for c in mine if bool(selected[c])]
        traffic = len(comm.traffic)
        got = exchange.run(secure, updates_of(mine_sent, x, n, p_vis, bad, huge, round_), (p_vis, p_txt), dtype,
                           selected)
        if not mine_sent and comm.rank != 0:  # this rank's clients all sat out: no update bytes
            assert all(t.sent == 0 for t in comm.traffic[traffic:] if t.tag == "update"), name
        ref_in = x.clone().float()
        ref_in[~good] = float("nan")  # the one-shot reference leaves out rows holding NaN
        ref = reference.aggregate(ref_in[:, :p_vis], ref_in[:, p_vis:], n)
        personal = got.personal[0] if len(mine_sent) else got.global_personal
        if personal is None:  # a rank without clients in a round everybody else sends in: shared part only
            personal, ref.personal = torch.zeros(p_txt, dtype=dtype), torch.zeros(k, p_txt)
            x = torch.cat([x[:, :p_vis], torch.zeros(k, p_txt, dtype=dtype)], 1)
        row = torch.cat([got.shared[0], personal])
        if name.startswith("fedadam"):  # the server step after the sum: FedAdam's reference, float32
            torch.testing.assert_close(row, torch.cat([ref.shared[0], ref.personal[0]]), rtol=1e-5, atol=1e-6)
        else:
            w = reference.plan(n, good, None).shared[0]
            terms = w[:, None] * x.double()  # [K, P]: bad clients weigh 0
            exact = terms.sum(0)
            mass = terms.abs().sum(0)
            # dtype's rounding of the result: half an ulp, 2^-24 (float32: 23 fraction bits) or 2^-8
            # (bf16: 7) relative
            half_ulp = 2.0 ** -24 if dtype == torch.float32 else 2.0 ** -8
            tol = quantisation_bound(int(good.sum())) + 4 * 2.0 ** -52 * mass + half_ulp * exact.abs()
            err = (row.double() - exact).abs()
            assert bool((err <= tol).all()), (name, float((err - tol).max()))
            # plain FedAvg: float32 weights and a float32 sum of K terms, (K + 2) ulp of the mass
            plain = torch.cat([ref.shared[0], ref.personal[0]]).double()
            assert bool(((row.double() - plain).abs() <= tol + (k + 2) * 2.0 ** -24 * mass + half_ulp *
                         plain.abs()).all()), name
        assert all(torch.equal(r, got.personal[0]) for r in got.personal), name  # one global model
        if skipped:
            assert torch.equal(got.global_personal, row[p_vis:]), name
        else:
            assert got.global_personal is None, name
        if comm.rank == 0:
            assert got.excluded == sorted(bad + list(huge)), (name, got.excluded)
        if name.startswith("fedadam"):
            continue
        # Bitwise the same with the row sent whole, and with W = 1 (an exact integer sum).
        whole = SecureSumExchange(comm, blocks, torch.device("cpu"), 0, seed=cfg.run.seed).run(
            get_strategy(cfg.fl.strategy, cfg).aggregator, updates_of(mine_sent, x, n, p_vis, bad, huge, round_),
            (p_vis, p_txt), dtype, selected)
        assert torch.equal(whole.shared, got.shared) and torch.equal(whole.personal, got.personal), name
        if comm.rank == 0:
            alone = SecureSumExchange(solo, [range(k)], torch.device("cpu"), chunk_mb, seed=cfg.run.seed).run(
                get_strategy(cfg.fl.strategy, cfg).aggregator,
                updates_of(selected.nonzero().flatten().tolist(), x, n, p_vis, bad, huge, round_),
                (p_vis, p_txt), dtype, selected)
            assert torch.equal(alone.shared, got.shared), name
            assert torch.equal(alone.personal[0], got.personal[0] if len(mine_sent) else alone.personal[0]), name
    if name.startswith("fedadam") and comm.rank == 0:
        for key in ("w", "m", "v"):
            torch.testing.assert_close(secure.state[key], reference.state[key], rtol=1e-5, atol=1e-6)


def uniform_case(comm) -> None:
    """Three clients (one per rank under -n 3) send the same constant row, 16384 values in
    4 chunks: each row rank 0 receives passes chi-square on its top byte and KS on
    value / 2^64, while the sum still decodes to the constant."""
    k, p = 3, 16384
    cfg = config(["fl.strategy=fedavg"], k)
    blocks = block_ranges(k, comm.size)
    exchange = Recording(comm, blocks, torch.device("cpu"), 4096 * 8 / 2 ** 20, seed=cfg.run.seed)
    ups = updates_of(list(blocks[comm.rank]), torch.full((k, p), 0.5), torch.tensor([4, 4, 4]), 0, [], (), 1)
    got = exchange.run(get_strategy("fedavg", cfg).aggregator, ups, (0, p), torch.float32,
                       torch.ones(k, dtype=torch.bool))
    assert bool((got.personal == 0.5).all())
    if comm.rank == 0:
        assert len(exchange.blocks_seen) == 4
        rows = np.concatenate([b for _, b in sorted(exchange.blocks_seen, key=lambda t: t[0])], axis=1)  # [K, P]
        for words in rows:
            counts = np.bincount((words >> np.uint64(56)).astype(np.int64), minlength=256)
            chi2 = float(((counts - p / 256) ** 2 / (p / 256)).sum())
            u = np.sort(words.astype(np.float64) / 2.0 ** 64)
            ks = float(max((np.arange(1, p + 1) / p - u).max(), (u - np.arange(p) / p).max()))
            assert chi2 < CHI2_255_999 and ks < KS_16384_999, (chi2, ks)


def main() -> int:
    comm = Comm()
    solo = Comm(world=comm.world.Split(comm.rank, 0))  # each rank alone: the W = 1 exchange
    for case in CASES:
        run_case(comm, solo, *case)
    uniform_case(comm)
    comm.close()
    print(f"rank {comm.rank}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
