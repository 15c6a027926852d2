"""Codec benchmarks (fl.codec, fl/codecs.py): throughput against a plain copy, bytes per
round per codec against float32, and the error per block size.

    python -m pilot_hpc.tools.bench_codecs [--fraction 0.125] [--device cpu] [--repeat 3]

Prints a Markdown section for BENCHMARKS.md. The row is one LLaVA-1.5-7B client's update
(20,979,712 adapter + 159,907,840 LoRA parameters: python -m pilot_hpc.tools.dryrun), or
the leading `--fraction` of it (the 2-core development box is shared; the rates are per
byte and the row is far larger than any cache either way). Values are float32 changes of
a Gaussian with heavier tails (Student t, 4 degrees of freedom) at LoRA-update scale.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from pilot_hpc.fl import codecs
from pilot_hpc.fl.coded import round_bytes
from pilot_hpc.tools.bench import P_TEXT_7B, P_VISUAL_7B, machine


def best_of(fn, repeat: int, sync, clock) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = clock()
        fn()
        sync()
        best = min(best, clock() - t0)
    return best


def throughput(n: int, device: torch.device, repeat: int) -> dict:
    """Seconds of a plain copy of n float32 values, and of encode and decode per codec."""
    torch.manual_seed(0)
    x = (torch.distributions.StudentT(4.0).sample((n,)) * 1e-4).to(device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    # On a CPU, this process's CPU seconds (one thread): the shared development box gives a
    # process anything from 10% to 100% of a core, and wall time would measure the neighbours.
    clock = time.perf_counter if cuda else time.process_time
    dst = torch.empty_like(x)
    dst.copy_(x)  # its pages are mapped: the copy measures bandwidth, not page faults
    out = {"copy": best_of(lambda: dst.copy_(x), repeat, sync, clock), "codecs": {}}
    for codec in ("bfloat16", "int8", "int4"):
        raw = codecs.encode_rows(x, codec)
        enc = best_of(lambda: codecs.encode_rows(x, codec), repeat, sync, clock)
        # Into a reused buffer, as the server decodes each chunk (fl/coded.py).
        dec = best_of(lambda: codecs.decode_rows(raw, codec, n, out=dst), repeat, sync, clock)
        out["codecs"][codec] = {"encode": enc, "decode": dec, "bytes": raw.numel()}
        del raw
    return out


def block_errors(n: int, sizes=(32, 64, 128, 256)) -> dict:
    """Mean |x - decode(encode(x))| relative to mean |x| per block size (int8, int4),
    with the scale costing 4 / B bytes per value: the trade behind codecs.BLOCK."""
    x = torch.distributions.StudentT(4.0).sample((n - n % max(sizes),)) * 1e-4
    out = {}
    for b in sizes:
        xb = x.view(-1, b)
        absmax = xb.abs().amax(dim=1, keepdim=True)
        row = {}
        for codec, qmax in (("int8", 127), ("int4", 7)):
            s = absmax / qmax
            err = (xb - (xb / s).round().clamp(-qmax, qmax) * s).abs().mean() / x.abs().mean()
            row[codec] = float(err)
        out[b] = row
    return out


def report(n: int, fraction: float, device: torch.device, tp: dict, errors: dict, command: str) -> str:
    gb = 4 * n / 1e9
    copy_rate = gb / tp["copy"]
    lines = [
        "# Codec benchmarks: compressed updates (fl.codec)",
        "",
        f"Measured {datetime.date.today().isoformat()} on: {machine()}; "
        f"device {device}.",
        "",
        f"Command: `{command}`",
        "",
        f"Row: {n:,} float32 values ({fraction:g} of one LLaVA-1.5-7B client's {P_VISUAL_7B + P_TEXT_7B:,}-parameter "
        f"update, {gb * 1e3:.0f} MB), best of the repeats. Rates are float32 bytes in (encode) or out (decode) per "
        f"second ({'wall' if device.type == 'cuda' else 'CPU'} time, one thread on a CPU); the reference is "
        f"`dst.copy_(row)` of the same row into a mapped buffer; encode allocates its output, decode writes "
        f"into a reused buffer (as the exchange does): {copy_rate:.2f} GB/s.",
        "",
        "| codec | encode GB/s | ratio to copy | decode GB/s | ratio to copy | encode + decode, ratio to copy | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for codec, t in tp["codecs"].items():
        enc, dec = gb / t["encode"], gb / t["decode"]
        both = (gb / (t["encode"] + t["decode"])) / copy_rate
        lines.append(f"| {codec} | {enc:.2f} | {enc / copy_rate:.2f} | {dec:.2f} | {dec / copy_rate:.2f} | "
                     f"{both:.2f} | >= 0.25 |")
    lines += ["", "Bytes per client and round at LLaVA-1.5-7B sizes (scales included), from "
              "`fl/coded.py:round_bytes`, which the runs report (metrics.json `bytes`) and the traffic files "
              "match (tests/e2e/test_codec_runs.py):", "",
              "| codec (up = down) | FedAvg up | Pilot up (ATA's Gram pass: LoRA twice) | Pilot down (3 task rows + own LoRA) "
              "| vs float32 |", "|---|---|---|---|---|"]
    widths = (P_VISUAL_7B, P_TEXT_7B)
    for codec in codecs.CODECS:
        fa = round_bytes(codec, codec, widths, 1, 1)
        pi = round_bytes(codec, codec, widths, 3, 2)
        lines.append(f"| {codec} | {fa['up'] / 2**20:,.1f} MiB | {pi['up'] / 2**20:,.1f} MiB | "
                     f"{pi['down'] / 2**20:,.1f} MiB | {fa['up_float32'] / fa['up']:.2f}x fewer |")
    lines += ["", "Mean error relative to the mean |value| per block size B (one float32 scale per block: 4 / B "
              "bytes per value); codecs.BLOCK = 128:", "",
              "| B | scale bytes per value | int8 error | int4 error | int8 vs float32 | int4 vs float32 |",
              "|---|---|---|---|---|---|"]
    for b, row in errors.items():
        lines.append(f"| {b} | {4 / b:.4f} | {row['int8']:.2e} | {row['int4']:.2e} | {4 / (1 + 4 / b):.2f}x | "
                     f"{4 / (0.5 + 4 / b):.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.125)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU seconds of one thread (throughput)
    n = int((P_VISUAL_7B + P_TEXT_7B) * args.fraction)
    tp = throughput(n, device, args.repeat)
    errors = block_errors(min(n, 1 << 22))
    import sys

    argv = sys.argv[1:] if argv is None else argv
    command = "python -m pilot_hpc.tools.bench_codecs" + (f" {' '.join(argv)}" if argv else "")
    print(report(n, args.fraction, device, tp, errors, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
