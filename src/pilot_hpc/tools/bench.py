"""Exchange and aggregation benchmarks at LLaVA-1.5-7B scale, written to BENCHMARKS.md.

    python -m pilot_hpc.tools.bench [--out BENCHMARKS.md] [--quick]

Four ratios, each measured in one run on one machine (named in the report):
1. exchange: bytes per second into rank 0 of the streamed 9-rank gather of 7B-sized
   updates, against `python -m mpi4py.bench pingpong` at the size of one message;
2. aggregation: ATA (Gram pass + mix) and task-aware mixing of 9 x 181M parameters,
   chunk by chunk as the server does it, against one streaming read of the same bytes
   (a torch sum);
3. server peak memory during the exchange against the (K + 2) x chunk window;
4. a full smoke round with W = 9 ranks against W = 1 (the same clients and work).
Sizes come from the 7B dry run (python -m pilot_hpc.tools.dryrun): 20,979,712 parameters
per adapter and 159,907,840 of LoRA r = 64. --quick shrinks them 100x (for tests).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

from pilot_hpc.fl import aggregate
from pilot_hpc.fl.stream import chunk_columns, gram_in_place, mix_in_place, spans
from pilot_hpc.tools.mpiexec import find_mpiexec

P_VISUAL_7B = 20_979_712
P_TEXT_7B = 159_907_840
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run(cmd: list[str], timeout: int, env: dict | None = None) -> str:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def pingpong(size: int) -> tuple[int, float]:
    """mpi4py's own 2-rank ping-pong bandwidth (bytes/s) at one message size, rounded
    down to a power of two (the tool steps through powers of two) -> (size, bytes/s)."""
    size = 1 << (max(size, 1).bit_length() - 1)
    out = run([find_mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py.bench", "pingpong", "-a", "numpy",
               "-m", str(size), "-n", str(size), "-s", "2", "-l", "10", "--skip-large", "2", "--loop-large", "10",
               "--skip-huge", "2", "--loop-huge", "10"], timeout=600)
    for line in out.splitlines():
        fields = line.replace("|", " ").split()
        if fields and fields[0] == str(size):
            return size, float(fields[1]) * 1e6  # the tool reports MB/s
    raise RuntimeError(f"no bandwidth line for size {size} in:\n{out}")


def exchange(ranks: int, visual: int, text: int, chunk_mb: float, repeat: int) -> dict:
    out = run([find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "pilot_hpc.tools.bench_mpi", "--visual", str(visual),
               "--text", str(text), "--chunk-mb", str(chunk_mb), "--repeat", str(repeat)], timeout=1800,
              # A fixed mmap threshold makes glibc hand every large buffer back to the OS
              # when freed, so the resident-memory peak measures the live window.
              env={"MPIEXEC_TIMEOUT": "1700", "MALLOC_MMAP_THRESHOLD_": "65536"})
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def aggregation(k: int, visual: int, text: int, chunk_mb: float, device: torch.device, repeat: int) -> dict:
    """The server's mixing of [K, P] bf16 updates, chunk by chunk, against a torch sum."""
    gen = torch.Generator().manual_seed(0)
    width = visual + text
    updates = torch.empty(k, width, dtype=torch.bfloat16, device=device)
    for a, b in spans(0, width, 1 << 24):
        updates[:, a:b] = torch.randn(k, b - a, generator=gen).to(updates)
    n = torch.arange(1000, 1000 + k)
    tasks = torch.arange(k) % 3
    good = torch.ones(k, dtype=torch.bool)
    cols = chunk_columns(chunk_mb, 2, width)
    buf = torch.empty(k, cols, dtype=torch.bfloat16, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def server_step() -> None:
        gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        for a, b in spans(visual, width, cols):
            gram_in_place(gram, updates[:, a:b], device)
        ata = aggregate.ata_mixing(gram.cpu(), n, min(6, k - 1), 1e-12, good)
        task = aggregate.task_aware_coefficients(n, tasks, 3, good)
        for (a, b), coef in [(s, task) for s in spans(0, visual, cols)] + [(s, ata) for s in spans(visual, width, cols)]:
            block = buf[:, : b - a]
            block.copy_(updates[:, a:b])  # the received chunk (the exchange writes it here)
            mix_in_place(coef, block, device)
        sync()

    def read() -> None:
        updates.sum(dtype=torch.float32).item()

    times = {}
    for name, fn in (("sum", read), ("server", server_step), ("copy", lambda: [buf[:, : b - a].copy_(updates[:, a:b])
                                                                             for a, b in spans(0, width, cols)])):
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    return {"bytes": updates.numel() * 2, "device": str(device), "threads": torch.get_num_threads(), **times}


def smoke_round(ranks: int, cache_dir: str, out_dir: str) -> float:
    """Seconds of round 1 of the smoke config (from its progress line)."""
    cmd = [sys.executable, "-m", "pilot_hpc.main", "--config", "configs/smoke_9client.yaml", "fl.rounds=1",
           f"run.cache_dir={cache_dir}", f"run.output_dir={out_dir}", "run.resume=never"]
    if ranks > 1:
        cmd = [find_mpiexec(), "-n", str(ranks)] + cmd
    out = run(cmd, timeout=3600, env={"MPIEXEC_TIMEOUT": "3500"})
    found = re.search(r"round 1/1 stage 1 \| ([0-9.]+) s", out)
    if not found:
        raise RuntimeError(f"no round line in the output:\n{out[-2000:]}")
    return float(found.group(1))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    from importlib.metadata import version

    return (f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, GPU {gpu}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, mpi4py {version('mpi4py')}")


def report(ex: dict, ping: tuple[int, float], agg: dict, rounds: tuple[float, float] | None, command: str) -> str:
    gbs = lambda b, s: f"{b / s / 1e9:.2f} GB/s"  # noqa: E731
    ping_size, ping = ping
    gather = min(ex["gather_s"])
    rate = ex["bytes_into_root"] / gather
    window = (ex["ranks"] + 2) * ex["chunk_bytes"]
    lines = [
        "# Benchmarks: streamed exchange and server aggregation", "",
        f"Measured {datetime.date.today().isoformat()} on: {machine()}.", "",
        f"Command: `{command}`", "",
        f"Sizes: {ex['ranks']} clients, one per rank, each sending {ex['visual']:,} adapter + {ex['text']:,} LoRA "
        f"parameters in {ex['dtype']} ({ex['bytes_into_root'] / (ex['ranks'] - 1) / 2 ** 20:,.0f} MiB per client), "
        f"chunks of {ex['chunk_bytes'] / 2 ** 20:.1f} MiB per client ({ex['chunks']} per round).", "",
        "| measure | pilot_hpc | reference | ratio | target |",
        "|---|---|---|---|---|",
        f"| exchange: bytes into rank 0 per second (streamed Gatherv, best of {len(ex['gather_s'])}) | "
        f"{gbs(ex['bytes_into_root'], gather)} | mpi4py pingpong at {ping_size / 2 ** 20:.2f} MiB: "
        f"{ping / 1e9:.2f} GB/s | {rate / ping:.2f} | >= 0.7 |",
        f"| aggregation: ATA (Gram + mix) + task-aware of {ex['ranks']} x {ex['visual'] + ex['text']:,} params "
        f"on {agg['device']} ({agg['threads']} threads) | {agg['server']:.2f} s | torch sum over the same "
        f"{agg['bytes'] / 2 ** 30:.2f} GiB: {agg['sum']:.2f} s | {agg['server'] / agg['sum']:.2f} | <= 1.5 |",
    ]
    if ex["peak_above_start"] is not None:
        own = ex["received_results_bytes"]
        beyond = ex["peak_above_start"] - own
        lines.append(f"| server peak memory during one exchange, beyond its received results ({own / 2 ** 20:,.0f} MiB)"
                     f" | {beyond / 2 ** 20:,.0f} MiB | (K + 2) x chunk = {window / 2 ** 20:,.0f} MiB | "
                     f"{beyond / window:.2f} | <= 1 |")
    if rounds is not None:
        w1, w9 = rounds
        lines.append(f"| smoke round 1 (9 clients, same work), W = 9 ranks vs W = 1 | {w9:.1f} s | {w1:.1f} s | "
                     f"{w9 / w1:.2f} | overhead of the MPI path |")
    lines += ["", "Other numbers from the same run:", "",
              f"- one whole Pilot exchange (ATA's Gram pass over the LoRA, gather, mix, Bcast, Scatterv): "
              f"{ex['exchange_s']:.2f} s;",
              f"- copying the same bytes chunk by chunk into the receive buffer: {agg['copy']:.2f} s "
              f"({gbs(agg['bytes'], agg['copy'])}); the torch sum reads {gbs(agg['bytes'], agg['sum'])}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.tools.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--ranks", type=int, default=9)
    ap.add_argument("--chunk-mb", type=float, default=64.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="auto", help="aggregation device: auto | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="sizes / 100 and no smoke rounds (a check, not a benchmark)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/pilot_hpc"))
    args = ap.parse_args(argv)
    scale = 100 if args.quick else 1
    visual, text = P_VISUAL_7B // scale, P_TEXT_7B // scale
    chunk_mb = args.chunk_mb / scale
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    command = "python -m pilot_hpc.tools.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    ex = exchange(args.ranks, visual, text, chunk_mb, args.repeat)
    ping = pingpong(ex["chunk_bytes"])
    print(f"exchange {ex}\npingpong {ping[1] / 1e9:.2f} GB/s at {ping[0]} B", flush=True)
    agg = aggregation(args.ranks, visual, text, chunk_mb, device, args.repeat)
    print(f"aggregation {agg}", flush=True)
    rounds = None
    if not args.quick:
        out = os.path.join(REPO, "runs", "bench")
        w1 = smoke_round(1, args.cache_dir, os.path.join(out, "w1"))
        w9 = smoke_round(args.ranks, args.cache_dir, os.path.join(out, "w9"))
        rounds = (w1, w9)
    text_md = report(ex, ping, agg, rounds, command)
    with open(args.out, "w") as fh:
        fh.write(text_md)
    print(text_md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
