"""ATA's neighbour choices across runs, from the records Pilot writes into every round's
entry of metrics.json (strategies/pilot.py:ata_record):

    python -m pilot_hpc.tools.ata_choices \\
        --grid configs/grids/synthetic_fedmit2_distance.yaml --group-by variant \\
        --pair pilot_product:pilot

Per group and round (mean over its seeds, with the range): the share of neighbour slots
that hold a client of the same task (ATA finding its task: a choice blind to the task gives
(n_t - 1) / (K - 1) with n_t clients per task, 2/8 = 0.25 on 9 clients of 3 tasks; with
M = 6 of 8 the most is 2/6 = 0.33), and the ratio of the mean distance to
other-task clients over the mean distance to same-task clients (above 1: the tasks stand
apart in the distances). Per --pair A:B and round (runs of the same seed): the share of
clients whose neighbour set is the same in A as in B, and the mean share of a client's
neighbours that A and B have in common. Runs without records (Pilot runs from before the
record, other strategies) are named and left out.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from pilot_hpc.config import ConfigError
from pilot_hpc.tools.study import RUN_DIR, collect


def choices(doc: dict) -> dict[int, dict]:
    """round -> {"neighbours": [...], "distances": [[...]] or None, "tasks": [...]} of a run."""
    out = {}
    for r in doc["rounds"]:
        ata = r.get("ata")
        if ata is None:
            continue
        tasks = [c["task"] for c in sorted(r["clients"], key=lambda c: c["client"])]
        out[r["round"]] = {"neighbours": ata["neighbours"], "distances": ata.get("distances"), "tasks": tasks}
    return out


def same_task_share(rec: dict) -> float:
    """Of all neighbour slots of the round, the share that holds a client of the chooser's task."""
    tasks = rec["tasks"]
    slots = [(k, j) for k, near in enumerate(rec["neighbours"]) if near is not None for j in near]
    return sum(tasks[k] == tasks[j] for k, j in slots) / len(slots) if slots else float("nan")


def separation(rec: dict) -> float:
    """Mean distance to other-task clients / mean distance to same-task clients (nan when
    the round has no distances or no same-task pair)."""
    dist, tasks = rec["distances"], rec["tasks"]
    if dist is None:
        return float("nan")
    same, other = [], []
    for k in range(len(tasks)):
        for j in range(len(tasks)):
            if j != k and dist[k][j] is not None:
                (same if tasks[k] == tasks[j] else other).append(dist[k][j])
    return float(np.mean(other) / np.mean(same)) if same and other and np.mean(same) > 0 else float("nan")


def agreement(a: dict, b: dict) -> tuple[float, float]:
    """(share of clients with the same neighbour set, mean share of neighbours in common)
    over the clients that chose in both."""
    both = [(x, y) for x, y in zip(a["neighbours"], b["neighbours"]) if x is not None and y is not None]
    if not both:
        return float("nan"), float("nan")
    same = np.mean([set(x) == set(y) for x, y in both])
    common = np.mean([len(set(x) & set(y)) / max(len(x), 1) for x, y in both])
    return float(same), float(common)


def _fmt(values: list[float]) -> str:
    v = [x for x in values if not np.isnan(x)]
    if not v:
        return "-"
    return f"{np.mean(v):.2f}" if len(v) == 1 else f"{np.mean(v):.2f} ({min(v):.2f}-{max(v):.2f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.tools.ata_choices", description=__doc__.split("\n")[0])
    ap.add_argument("--grid", action="append", required=True, help="a grid YAML (repeat for more)")
    ap.add_argument("--group-by", action="append", required=True, help="its axis or 'variant' (one per --grid)")
    ap.add_argument("--pair", action="append", default=[], help="A:B, two group labels (repeatable)")
    ap.add_argument("--where", action="append", default=[],
                    help="KEY=VALUE: only the elements with this override (repeatable), as tools/study")
    a = ap.parse_args(argv)
    if len(a.grid) != len(a.group_by):
        print("error: give one --group-by per --grid", file=sys.stderr)
        return 2
    recs: dict[str, dict[int, dict]] = {}
    for grid, by in zip(a.grid, a.group_by):
        try:
            groups = collect([(grid, by)], tuple(a.where))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        # Grids are read one by one: a label of two grids is an error only when both hold
        # records (e.g. a reused no-privacy run without records beside a rerun with them).
        for label, runs in groups.items():
            mine = {}
            for seed, doc in runs.items():
                got = choices(doc)
                if got:
                    mine[seed] = got
                else:
                    print(f"note: {doc[RUN_DIR]} has no ATA records (not Pilot's top-M, or from before them)")
            if mine and label in recs:
                print(f"error: group {label!r} of {grid} has records, as a group of an earlier --grid does",
                      file=sys.stderr)
                return 2
            if mine:
                recs[label] = mine
    rounds = sorted({r for runs in recs.values() for got in runs.values() for r in got})
    print("\n| group | seeds | " + " | ".join(f"round {r}: same-task share, separation" for r in rounds) + " |")
    print("|---|---|" + "---|" * len(rounds))
    for label, runs in recs.items():
        cells = [f"{_fmt([same_task_share(g[r]) for g in runs.values() if r in g])}, "
                 f"{_fmt([separation(g[r]) for g in runs.values() if r in g])}" for r in rounds]
        print(f"| {label} | {','.join(map(str, sorted(runs)))} | " + " | ".join(cells) + " |")
    for pair in a.pair:
        left, _, right = pair.partition(":")
        if left not in recs or right not in recs:
            print(f"error: --pair {pair}: no ATA records for {left if left not in recs else right!r}",
                  file=sys.stderr)
            return 2
        seeds = sorted(set(recs[left]) & set(recs[right]))
        print(f"\n{left} vs {right}, seeds {seeds}: share of clients with the same neighbour set; "
              "mean share of neighbours in common")
        print("| round | same set | in common |\n|---|---|---|")
        for r in rounds:
            got = [agreement(recs[left][s][r], recs[right][s][r]) for s in seeds
                   if r in recs[left][s] and r in recs[right][s]]
            print(f"| {r} | {_fmt([g[0] for g in got])} | {_fmt([g[1] for g in got])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
