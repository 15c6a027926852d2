"""Secure aggregation's cost against the plain streamed exchange, in one process (W = 1):
the clients' fixed point and masks (K - 1 ChaCha20 streams each), the server's ring sum
and decode, against the float32 mix of the same rows. No network: what it adds in
computation. `python -m pilot_hpc.tools.bench_secagg [--clients 9] [--values 4194304]`.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from pilot_hpc.config import load_config
from pilot_hpc.fl.comm import Comm, block_ranges
from pilot_hpc.fl.secagg import SecureSumExchange
from pilot_hpc.fl.strategies import get_strategy
from pilot_hpc.fl.stream import StreamedExchange
from pilot_hpc.fl.update import ClientUpdate, Part, Participation


def one_round(exchange, aggregator, x: torch.Tensor, split: int) -> float:
    k = x.shape[0]
    ups = [ClientUpdate(client=c, num_samples=10 + c, round=1, status=Participation.PARTICIPATED,
                        parts={Part.SHARED_BY_TASK: x[c, :split].clone(), Part.PERSONAL: x[c, split:].clone()})
           for c in range(k)]
    t0 = time.perf_counter()
    exchange.run(aggregator, ups, (split, x.shape[1] - split), torch.float32, torch.ones(k, dtype=torch.bool))
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=9)
    ap.add_argument("--values", type=int, default=1 << 22, help="values per client row")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    k, p = args.clients, args.values
    tasks = (["vqa", "caption", "grounding"] * k)[:k]
    cfg = load_config(None, ["fl.strategy=fedavg", f"fl.num_clients={k}", f"fl.client_tasks={tasks}", "pilot.top_m=1"])
    comm = Comm()
    x = torch.randn(k, p, generator=torch.Generator().manual_seed(0))
    split = p // 4
    plain = StreamedExchange(comm, block_ranges(k, 1), torch.device("cpu"), cfg.fl.chunk_mb)
    secure = SecureSumExchange(comm, block_ranges(k, 1), torch.device("cpu"), cfg.fl.chunk_mb, seed=0)
    agg = get_strategy("fedavg", cfg).aggregator
    t_plain = min(one_round(plain, agg, x, split) for _ in range(args.repeats))
    t_secure = min(one_round(secure, agg, x, split) for _ in range(args.repeats))
    print(f"{platform.processor() or platform.machine()}: K = {k}, {p} float32 values per client, W = 1, "
          f"fl.chunk_mb={cfg.fl.chunk_mb:g}: plain exchange {t_plain:.3f} s, secure {t_secure:.3f} s, "
          f"ratio {t_secure / t_plain:.1f}; bytes per value sent: 4 (float32) vs 8 (masked int64)")


if __name__ == "__main__":
    main()
