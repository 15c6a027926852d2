"""Runs every strategy with W = 1 and under `mpiexec -n W`, and checks that both give the
same `final` metrics (and per-round history), bitwise; writes a Markdown table.

    python -m pilot_hpc.tools.parity [--config configs/smoke_9client.yaml] [--ranks 9]
                               [--strategies pilot fedavg ...] [--out docs/parity_smoke.md]

Centralized training pools every client's data in one process by design, so it runs
with W = 1 only (the MPI run is refused with exit code 2, which is checked).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

from pilot_hpc.tools.bench import REPO
from pilot_hpc.tools.mpiexec import find_mpiexec
from pilot_hpc.fl.strategies import REGISTRY


def run_once(config: str, strategy: str, ranks: int, out: str, extra: list[str]) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "pilot_hpc.main", "--config", config, f"fl.strategy={strategy}",
           f"run.output_dir={out}", "run.resume=never"] + extra
    if ranks > 1:
        cmd = [find_mpiexec(), "-n", str(ranks)] + cmd
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=7200,
                          env=dict(os.environ, MPIEXEC_TIMEOUT="7000"))
    return proc.returncode, time.perf_counter() - t0, proc.stderr[-1500:]


def load(folder: str) -> dict:
    from pilot_hpc.report import read_metrics

    return read_metrics(os.path.join(folder, "metrics.json"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.tools.parity", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/smoke_9client.yaml")
    ap.add_argument("--ranks", type=int, default=9)
    ap.add_argument("--strategies", nargs="*", default=sorted(REGISTRY))
    ap.add_argument("--out", default="docs/parity_smoke.md")
    ap.add_argument("--runs", default="runs/parity")
    ap.add_argument("overrides", nargs="*", help="section.key=value for both runs")
    args = ap.parse_args(argv)
    rows, failed = [], False
    for name in args.strategies:
        base = os.path.join(args.runs, name)
        code1, t1, err1 = run_once(args.config, name, 1, os.path.join(base, "w1"), args.overrides)
        code_w, t_w, err_w = run_once(args.config, name, args.ranks, os.path.join(base, f"w{args.ranks}"),
                                      args.overrides)
        if code1 != 0:
            verdict = f"W = 1 failed (exit {code1}): {err1.strip().splitlines()[-1] if err1.strip() else ''}"
        elif REGISTRY[name][0].pooled:  # the client policy decides pooling
            verdict = ("W = 1 only, as designed: the MPI run was refused (exit 2)" if code_w == 2
                       else f"the MPI run should be refused with exit 2, got {code_w}")
        elif code_w != 0:
            verdict = f"W = {args.ranks} failed (exit {code_w}): {err_w.strip().splitlines()[-1] if err_w else ''}"
        else:
            a, b = load(os.path.join(base, "w1")), load(os.path.join(base, f"w{args.ranks}"))
            same = a["final"] == b["final"] and a["rounds"] == b["rounds"]
            mean = sum(c["value"] for c in a["final"]) / len(a["final"])
            verdict = f"identical (mean final metric {mean:.2f})" if same else "DIFFERENT final metrics"
        failed |= not verdict.startswith(("identical", "W = 1 only"))
        rows.append(f"| {name} | {t1:.0f} s | {t_w:.0f} s | {verdict} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        f"# W = 1 vs W = {args.ranks}: every strategy, same final metrics", "",
        f"Run {datetime.date.today().isoformat()} with `python -m pilot_hpc.tools.parity "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}` on {os.cpu_count()} CPU cores. \"Identical\" "
        "compares the `final` and `rounds` entries of both runs' metrics.json for equality (values and mean "
        "losses, bitwise).", "",
        f"| strategy | W = 1 wall | W = {args.ranks} wall | result |", "|---|---|---|---|", *rows, ""])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
