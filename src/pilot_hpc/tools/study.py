"""A study's tables across grids, with paired per-seed differences.

    python -m pilot_hpc.tools.study \\
        --grid configs/grids/synthetic_fedmit_table1.yaml --group-by fl.strategy \\
        --grid configs/grids/synthetic_fedmit_fedadam.yaml --group-by fl.strategy \\
        --pair pilot:local --pair local:fedavg --plot docs/results_synthetic_fedmit.png

Each --grid (with its --group-by, as `launch` takes them) contributes its groups (one
per value of the axis, or per variant); the groups of all grids form one table, the
paper's layout (per client, then per task, mean ± std over the runs). A --pair A:B
lists, per task, the difference A - B of the task average in every seed (runs of the
two groups with the same run.seed: the same data and the same base model), its mean,
and in how many seeds A > B, A = B (the same score to the metric's 4 decimals) and
A < B. A paired difference cancels what a seed does to both
(its data, its warm start), which the standard deviations of the table do not.
Reading finished runs only (metrics.json, or the run a reused.json names), it never
starts one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from pilot_hpc.config import ConfigError
from pilot_hpc.tools import stats


def _seed(e) -> int:
    from pilot_hpc.config import load_config

    return load_config(e.argv[1], e.argv[2:]).run.seed


def collect(grids: list[tuple[str, str]], where: tuple[str, ...] = ()) -> dict[str, dict[int, dict]]:
    """group label -> {seed: metrics document}, over (grid file, group-by) pairs, of the
    elements whose overrides include every KEY=VALUE of `where`; a label met in two grids,
    or two runs of one seed in a group (another axis varies: restrict it with `where`), is
    an error (the tables would mix different runs)."""
    from pilot_hpc import launch, report

    groups: dict[str, dict[int, dict]] = {}
    for path, by in grids:
        grid = launch.load_grid(path)
        launch.check_group_by(grid, by)
        mine: dict[str, dict[int, dict]] = {}
        seen: dict[str, dict[int, object]] = {}  # label -> seed -> its element (finished or not)
        for e in launch.expand(grid):
            if not set(where) <= set(e.argv):
                continue
            label = str(launch.group_value(e, grid, by))
            metrics = os.path.join(launch.result_dir(e), "metrics.json")
            slot = mine.setdefault(label, {})
            seed = _seed(e)
            twin = seen.setdefault(label, {}).setdefault(seed, e)
            if twin is not e:
                raise ConfigError(f"group {label!r} of {path} has two runs of seed {seed}: {twin.name} and "
                                  f"{e.name} (another axis varies: pick one value of it with --where KEY=VALUE)")
            if launch.finished(e):
                doc = report.read_metrics(metrics)
                doc[RUN_DIR] = launch.result_dir(e)
                slot[seed] = doc
        for label, runs in mine.items():
            if label in groups:
                raise ConfigError(f"group {label!r} of {path} is already a group of an earlier --grid")
            groups[label] = runs
    return groups


RUN_DIR = "_run_dir"  # where collect() found a run (its predictions files are read from there)
SUBSET = "_subset"  # set by restrict(): only the items of that subset count (seen / unseen)


def restrict(groups: dict[str, dict[int, dict]], subset: str) -> dict[str, dict[int, dict]]:
    """The same runs with every final value replaced by the subset's (`value_<subset>`, the
    share of the test items in it: data.eval_subsets) and the item tests restricted to the
    predictions rows marked with it. A run without that subset is an error naming it."""
    out: dict[str, dict[int, dict]] = {}
    for label, runs in groups.items():
        out[label] = {}
        for seed, doc in runs.items():
            key = f"value_{subset}"
            if any(key not in c for c in doc["final"]):
                raise ConfigError(f"--subset {subset}: run {doc.get(RUN_DIR, label)} (seed {seed}) has no {key!r} "
                                  "in its final rows; its world scores no such subset (data.eval_subsets)")
            final = [dict(c, value=c[key]) for c in doc["final"]]
            out[label][seed] = dict(doc, final=final, **{SUBSET: subset})
    return out


def item_scores(doc: dict, task: str) -> dict[str, list[float]] | None:
    """item id -> the final round's scores of the task's clients on it (None: no
    predictions files, e.g. a run whose folder holds only metrics.json)."""
    folder = doc.get(RUN_DIR)
    if folder is None or not doc.get("rounds"):
        return None
    round_ = doc["rounds"][-1]["round"]
    out: dict[str, list[float]] = {}
    for c in doc["final"]:
        if c["task"] != task:
            continue
        path = os.path.join(folder, "predictions", f"round_{round_:03d}", f"client_{c['client']:02d}.jsonl")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                if SUBSET in doc and row.get("subset") != doc[SUBSET]:
                    continue
                out.setdefault(str(row["id"]), []).append(float(row["score"]))
    return out


def item_differences(doc_a: dict, doc_b: dict, task: str) -> np.ndarray | None:
    """Per item both runs scored: mean over the task's clients of A's score minus B's, x 100
    (the tables' scale)."""
    a, b = item_scores(doc_a, task), item_scores(doc_b, task)
    if a is None or b is None:
        return None
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    return np.array([100.0 * (np.mean(a[i]) - np.mean(b[i])) for i in shared])


def task_means(doc: dict) -> dict[str, float]:
    """The final per-task averages of one run."""
    tasks = list(dict.fromkeys(c["task"] for c in doc["final"]))
    return {t: float(np.mean([c["value"] for c in doc["final"] if c["task"] == t])) for t in tasks}


def paired(groups: dict[str, dict[int, dict]], a: str, b: str) -> list[dict]:
    """Per task: the seeds both groups ran, A - B per seed, the mean, and the seeds with A > B."""
    for g in (a, b):
        if g not in groups:
            raise ConfigError(f"--pair {a}:{b}: no group {g!r}; groups: {sorted(groups)}")
    seeds = sorted(set(groups[a]) & set(groups[b]))
    if not seeds:
        return []
    ta = {s: task_means(groups[a][s]) for s in seeds}
    tb = {s: task_means(groups[b][s]) for s in seeds}
    rows = []
    for task in ta[seeds[0]]:
        diffs = [ta[s][task] - tb[s][task] for s in seeds]
        ties = sum(stats.tied(d) for d in diffs)
        interval = stats.t_interval(diffs)
        items = [item_differences(groups[a][s], groups[b][s], task) for s in seeds]
        boot = stats.paired_bootstrap(items) if all(d is not None for d in items) else None
        rows.append({"pair": f"{a} - {b}", "task": task, "seeds": seeds, "diffs": diffs,
                     "mean": float(np.mean(diffs)), "ci": (interval.low, interval.high),
                     "p_seeds": stats.paired_t_p(diffs), "items": boot,
                     "wins": sum(d > 0 and not stats.tied(d) for d in diffs), "ties": ties})
    return rows


def paired_table(rows: list[dict]) -> str:
    # One column per seed of any row; a row that lacks a seed leaves its cell empty.
    seeds = sorted({s for r in rows for s in r["seeds"]})
    head = ["difference", "task"] + [f"seed {s}" for s in seeds] + [
        "mean", "95% CI (t, seeds)", "p (t, seeds)", "items: mean [95% CI], p (bootstrap)", "seeds A > B / = / <"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        got = dict(zip(r["seeds"], r["diffs"]))
        per_seed = [f"{got[s]:+.2f}" if s in got else "" for s in seeds]
        losses = len(r["diffs"]) - r["wins"] - r["ties"]
        lo, hi = r["ci"]
        ci = "n/a" if np.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]"
        p = "n/a" if np.isnan(r["p_seeds"]) else f"{r['p_seeds']:.3f}"
        b = r["items"]
        items = "n/a" if b is None else f"{b.mean:+.2f} [{b.low:+.2f}, {b.high:+.2f}], {b.p:.3f}"
        lines.append("| " + " | ".join([r["pair"], r["task"]] + per_seed +
                                       [f"{r['mean']:+.2f}", ci, p, items,
                                        f"{r['wins']} / {r['ties']} / {losses}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pilot_hpc import report

    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.tools.study", description=__doc__.split("\n")[0])
    ap.add_argument("--grid", action="append", required=True, help="a grid YAML (repeat for more)")
    ap.add_argument("--group-by", action="append", required=True, help="its axis or 'variant' (one per --grid)")
    ap.add_argument("--pair", action="append", default=[], help="A:B, two group labels (repeatable)")
    ap.add_argument("--plot", default=None, help="PNG: task averages per round of every group")
    ap.add_argument("--where", action="append", default=[],
                    help="KEY=VALUE: only the elements with this override (repeatable), e.g. fl.strategy=pilot")
    ap.add_argument("--subset", default=None,
                    help="seen or unseen: the final values and item tests of that subset of the test items only")
    ap.add_argument("--averages", action="store_true",
                    help="the table's task averages only, no column per client (for many clients)")
    args = ap.parse_args(argv)
    try:
        if len(args.grid) != len(args.group_by):
            raise ConfigError(f"{len(args.grid)} --grid but {len(args.group_by)} --group-by: give one per grid")
        groups = collect(list(zip(args.grid, args.group_by)), tuple(args.where))
        if args.subset:
            groups = restrict(groups, args.subset)
        rows = [r for p in args.pair for r in paired(groups, *(p.split(":", 1) if ":" in p else (p, "")))]
    except ConfigError as err:
        print(f"pilot_hpc.tools.study: {err}", file=sys.stderr)
        return 2
    docs = {label: [runs[s] for s in sorted(runs)] for label, runs in groups.items()}
    if not any(docs.values()):
        print("no run of these grids has finished yet")
        return 1
    print(report.comparison_table(docs, per_client=not args.averages))
    print(f"\n{report.SD_CONVENTION}; the paired rows' conventions: pilot_hpc/tools/stats.py")
    missing = [label for label, d in docs.items() if not d]
    if missing:
        print(f"\ngroups without a finished run yet: {', '.join(missing)}")
    if rows:
        print("\n" + paired_table(rows))
    if args.plot:
        report.comparison_plot({k: v for k, v in docs.items() if v}, args.plot, "task average per round")
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
