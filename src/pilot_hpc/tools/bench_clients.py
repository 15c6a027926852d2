"""Many clients on few ranks (issue: clients per round, client state off the rank): rank 0's
peak resident memory and a round's wall time for K = 9, 36 and 144 clients on 3 ranks, 9
sampled per round (stratified), evaluating a fixed sample of 9 clients, with
fl.client_state=disk and =memory.

    python -m pilot_hpc.tools.bench_clients --out bench_clients.md [--ks 9 36 144]

Each run is the small synthetic world of tests/helpers.py (tiny model, a few steps per
round) with K clients, three per task group cycling through the three tasks. Rank 0's
peak resident set comes from getrusage after its run (printed by a wrapper around
pilot_hpc.main); a round's wall time from the round's log line (round 2: not the first,
which also pays for the first stage-2 set-up, nor round 0, which only evaluates).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

WRAPPER = """
import resource, runpy, sys
from mpi4py import MPI
try:
    runpy.run_module("pilot_hpc.main", run_name="__main__", alter_sys=True)
finally:
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(f"BENCH rank0 maxrss_kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
"""


def overrides(k: int, state: str, cache: str, out: str) -> list[str]:
    tasks = (["vqa", "caption", "grounding"] * k)[:k]
    return [f"run.cache_dir={cache}", f"run.output_dir={out}", f"fl.num_clients={k}",
            f"fl.client_tasks=[{', '.join(tasks)}]", "pilot.top_m=2", "fl.rounds=3",
            "fl.clients_per_round=9", "fl.sampling=stratified", "fl.eval_clients=sample", "fl.eval_sample=9",
            f"fl.client_state={state}", "data.train_min=24", "data.train_max=40", "data.eval_samples=6",
            "pretrain.steps=10", "pretrain.samples=60", "train.max_steps=3", "train.batch_size=8",
            "train.eval_batch_size=8", "train.max_new_tokens=12"]


def run(k: int, state: str, cache: str, root: str, mpiexec: str) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = os.path.join(root, f"k{k}_{state}")
    cmd = [mpiexec, "-n", "3", sys.executable, "-c", WRAPPER, "--config",
           os.path.join(repo, "configs", "smoke_9client.yaml")] + overrides(k, state, cache, out)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"K={k} {state}: exit {proc.returncode}\n{text[-3000:]}")
    rss = int(re.search(r"BENCH rank0 maxrss_kib (\d+)", text).group(1)) * 1024
    rounds = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"round (\d+)/\d+ stage \d+ \| ([\d.]+) s", text)}
    return {"k": k, "state": state, "rss": rss, "round2": rounds[2], "wall": wall, "spread": spread(k, cache, out)}


def spread(k: int, cache: str, out: str, round_: int = 2) -> list[int]:
    """How many of the round's sampled clients each of the 3 ranks trains (the slowest
    rank sets the round's training time; with K = 9, every rank trains 3)."""
    from pilot_hpc.config import load_config
    from pilot_hpc.fl import participation
    from pilot_hpc.fl.comm import block_ranges

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    cfg = load_config(os.path.join(repo, "configs", "smoke_9client.yaml"), overrides(k, "disk", cache, out))
    chosen = participation.selected(cfg, round_)
    return [int(chosen[list(b)].sum()) for b in block_ranges(k, 3)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[9, 36, 144])
    ap.add_argument("--out", default="")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/pilot_hpc_bench_clients"))
    args = ap.parse_args(argv)
    from pilot_hpc.tools.mpiexec import find_mpiexec

    mpiexec = find_mpiexec()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for state in ("disk", "memory"):
            for k in args.ks:
                rows.append(run(k, state, args.cache, root, mpiexec))
                r = rows[-1]
                print(f"K={k:4d} {state:6s} rank 0 peak rss {r['rss'] / 2**20:8.1f} MiB  round 2 {r['round2']:6.2f} s  "
                      f"whole run {r['wall']:6.1f} s  round 2's sampled clients per rank {r['spread']}", flush=True)
    base = {s: next(r for r in rows if r["state"] == s and r["k"] == args.ks[0]) for s in ("disk", "memory")}
    lines = ["| K | client_state | rank 0 peak RSS | vs K = %d | round 2 wall | vs K = %d | round 2 trainees per rank |"
             % (args.ks[0], args.ks[0]), "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base[r["state"]]
        lines.append(f"| {r['k']} | {r['state']} | {r['rss'] / 2**20:.1f} MiB | {r['rss'] / b['rss']:.3f} | "
                     f"{r['round2']:.2f} s | {r['round2'] / b['round2']:.2f} | {r['spread']} |")
    mem = [r for r in rows if r["state"] == "memory"]
    if len(mem) > 1:
        per = (mem[-1]["rss"] - mem[0]["rss"]) / (mem[-1]["k"] - mem[0]["k"])
        lines.append(f"\nWith fl.client_state=memory rank 0 grows by {per / 2**10:.1f} KiB per client "
                     f"(K = {mem[0]['k']} -> {mem[-1]['k']}).")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
