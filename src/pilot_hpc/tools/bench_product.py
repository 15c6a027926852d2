"""ATA's Gram pass on LoRA products (pilot.distance=product) against today's flat pass.

    python -m pilot_hpc.tools.bench_product [--layers 4] [--clients 9] [--rank 64] [--device cpu]

The personal rows of K clients at LLaVA-1.5-7B's LoRA shapes (every linear of a LLaMA-7B
layer: q, k, v, o 4096 -> 4096; gate, up 4096 -> 11008; down 11008 -> 4096; rank r),
`--layers` of the 32 layers (the 7B row is 32 layers: 159,907,840 values at r = 64), in
bfloat16 as they travel in the paper's runs, fed chunk by chunk (fl.chunk_mb) to

  flat:    stream.gram_in_place (centred float32 block products, float64 sums), today's pass;
  product: lora_distance.ProductGram (per module the [K r]^2 Gram matrices of the rank
           components, float32, block sums in float64).

Both read the same chunks; best of `--repeat` timings each, interleaved. Also reported:
how far the float32 product distances are from a float64 computation of the same pass
(max relative error over the pairs), on rows built like trained LoRA (a common part
plus a smaller per-client part), so that the figure is about distances between close
clients. Prints a markdown block for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from pilot_hpc.fl import aggregate
from pilot_hpc.fl.lora_distance import ProductGram, layout
from pilot_hpc.fl.stream import chunk_columns, gram_in_place, spans

# (name, in, out) of the LoRA targets of one LLaMA-7B layer.
LAYER = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
         ("gate_proj", 4096, 11008), ("up_proj", 4096, 11008), ("down_proj", 11008, 4096)]


def named_row(layers: int, rank: int) -> list[tuple[str, torch.Size]]:
    named = []
    for i in range(layers):
        for name, n_in, n_out in LAYER:
            named.append((f"layers.{i}.{name}.lora_A.default.weight", torch.empty(rank, n_in, device="meta")))
            named.append((f"layers.{i}.{name}.lora_B.default.weight", torch.empty(n_out, rank, device="meta")))
    return named


def rows(k: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Common part + 0.1 x a per-client part: the clients are close, as after aggregation."""
    gen = torch.Generator().manual_seed(0)
    out = torch.empty(k, width, dtype=dtype, device=device)
    for a, b in spans(0, width, 1 << 24):
        common = torch.randn(1, b - a, generator=gen)
        out[:, a:b] = (common + 0.1 * torch.randn(k, b - a, generator=gen)).to(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.tools.bench_product", description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="LLaMA-7B layers of LoRA (of 32)")
    ap.add_argument("--clients", type=int, default=9)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--chunk-mb", type=float, default=64.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    named = named_row(a.layers, a.rank)
    scale = 2.0  # lora_alpha / r = 128 / 64, dryrun's default
    spans_ = layout(named, scale)
    width = sum(t.numel() for _, t in named)
    data = rows(a.clients, width, torch.bfloat16, device)
    cols = chunk_columns(a.chunk_mb, 2, width)
    chunks = spans(0, width, cols)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def flat() -> torch.Tensor:
        gram = torch.zeros(a.clients, a.clients, dtype=torch.float64, device=device)
        for lo, hi in chunks:
            gram_in_place(gram, data[:, lo:hi], device)
        sync()
        return gram

    def product(dtype=None) -> torch.Tensor:
        acc = ProductGram(spans_, a.clients, device)
        for lo, hi in chunks:
            block = data[:, lo:hi]
            acc.feed(block if dtype is None else block.to(dtype), lo)
        sync()
        return acc.result()

    # Wall time and this process's CPU time (all its threads): on a shared machine the
    # CPU time is the steadier measure of the work each pass does.
    times = {"flat": float("inf"), "product": float("inf")}
    cpu = dict(times)
    flat(), product()  # warm-up
    for _ in range(a.repeat):
        for name, fn in (("flat", flat), ("product", product)):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    d32 = aggregate.distances_from_gram(product().cpu())
    d64 = aggregate.distances_from_gram(product(torch.float64).cpu())
    off = ~torch.eye(a.clients, dtype=torch.bool)
    rel = float(((d32 - d64).abs()[off] / d64[off]).max())
    ratio = times["product"] / times["flat"]
    threads = torch.get_num_threads()
    print(f"Sizes: {a.clients} clients, LoRA rank {a.rank} on q,k,v,o,gate,up,down of {a.layers} of LLaMA-7B's 32 "
          f"layers ({width:,} values per client, bfloat16; the whole 7B row is 32 layers), chunks of "
          f"{a.chunk_mb} MiB ({len(chunks)} per pass), {device} ({threads} threads), best of {a.repeat}.\n")
    print("| measure | product | flat (today) | ratio | target |\n|---|---|---|---|---|")
    print(f"| ATA Gram pass over the LoRA rows, wall | {times['product']:.2f} s | {times['flat']:.2f} s | {ratio:.2f} | "
          "<= 1.5 |")
    print(f"| the same, CPU time of the process | {cpu['product']:.2f} s | {cpu['flat']:.2f} s | "
          f"{cpu['product'] / cpu['flat']:.2f} | <= 1.5 |\n")
    with open("/proc/loadavg") as fh:
        print(f"Load average at the end (1, 5, 15 min): {' '.join(fh.read().split()[:3])}.")
    print(f"Float32 product distances vs the same pass in float64: max relative error {rel:.1e} "
          f"(clients' rows: common part + 0.1 x own part).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
