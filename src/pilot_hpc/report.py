"""Results as people read them: one run's outputs on rank 0 (metrics.json, results.md in
the paper's table shape, a plot), and the comparison across runs (methods x seeds).

Comparison input: {group label: [metrics.json documents of that group's runs (e.g. its
seeds)]}; output: Markdown with one row per group, its per-client final metric and
per-task averages as mean +- std over the group's runs, and a PNG with one panel per
task showing the task-average metric per round for every group.
"""

from __future__ import annotations

import json
import os

import numpy as np

from pilot_hpc import cpumath, jsonout

NAN = float("nan")
METRIC_LABEL = {"vqa_accuracy": "VQA acc", "cider": "CIDEr", "iou@0.5": "Acc@IoU0.5"}


def metrics_document(history: list[dict], cfg) -> dict:
    # cpu_math: the CPU math libraries' code paths the run used (cpumath.py), which decide
    # whether its numbers reproduce on another CPU model.
    return {"strategy": cfg.fl.strategy, "config_hash": cfg.hash(), "cpu_math": cpumath.describe(), "rounds": history,
            "final": history[-1]["clients"] if history else []}


def read_metrics(path: str) -> dict:
    """A metrics.json document with its nulls (non-finite values, see jsonout) read back as
    NaN in the client rows, so means and tables treat them as the NaN the run held: no value. One NaN
    object for all of them, as json.load uses for a bare NaN: list and dict equality
    check identity first, so two documents with no value in the same places compare equal
    (tools/parity compares runs this way)."""
    with open(path) as fh:
        doc = json.load(fh)
    for row in [c for r in doc.get("rounds", []) for c in r["clients"]] + doc.get("final", []):
        for key, value in row.items():
            if value is None or value != value:  # null, or a bare NaN (older files)
                row[key] = NAN
    return doc


def results_table(history: list[dict]) -> str:
    """Markdown: one row per client (task, metric, round 0, final), then task averages and the mean."""
    first, last = history[0], history[-1]
    lines = [f"| client | task | metric | round 0 | round {last['round']} | change |", "|---|---|---|---|---|---|"]
    for a, b in zip(first["clients"], last["clients"]):
        lines.append(f"| {b['client']} | {b['task']} | {METRIC_LABEL.get(b['metric'], b['metric'])} | "
                     f"{a['value']:.1f} | {b['value']:.1f} | {b['value'] - a['value']:+.1f} |")
    tasks = list(dict.fromkeys(c["task"] for c in last["clients"]))
    for task in tasks:
        a = np.mean([c["value"] for c in first["clients"] if c["task"] == task])
        b = np.mean([c["value"] for c in last["clients"] if c["task"] == task])
        lines.append(f"| **avg** | {task} | | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    a = np.mean([c["value"] for c in first["clients"]])
    b = np.mean([c["value"] for c in last["clients"]])
    lines.append(f"| **mean** | all | | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    return "\n".join(lines)


def plot(history: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = history[0]["clients"]
    tasks = list(dict.fromkeys(c["task"] for c in clients))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    rounds = [h["round"] for h in history]
    for ax, task in zip(axes[0], tasks):
        members = [c for c in clients if c["task"] == task]
        for c in members:
            values = [h["clients"][c["client"]]["value"] for h in history]
            ax.plot(rounds, values, marker="o", label=f"client {c['client']}")
        metric = members[0]["metric"]
        ax.set_title(f"{task} ({METRIC_LABEL.get(metric, metric)} x100)")
        ax.set_xlabel("round")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("score (x100, as in the paper)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def privacy_note(history: list[dict]) -> str:
    """results.md's privacy paragraph from the last round's entry (pilot_hpc.fl.privacy);
    empty for a run without privacy."""
    p = history[-1].get("privacy") if history else None
    if not p:
        return ""
    eps = p["epsilon"]
    eps = "inf (no noise: no guarantee)" if eps is None or eps != eps or eps == float("inf") else f"{eps:.4g}"
    clip = f"clipped to {p['clip_norm']:g}"
    if "clip_norm_next" in p:  # adaptive clipping: the last round's C
        clip = (f"clipped to an adaptive bound ({p['clip_norm']:g} in the last round; updates' noise multiplier "
                f"{p['update_noise_multiplier']:.6g}, count noise std {p['clip_count_stddev']:.6g})")
    return (f"\nPrivacy ({p['where']}-side client-level DP): epsilon {eps} at delta {p['delta']:g} after round "
            f"{history[-1]['round']} ({p['accountant']} accountant; each round's change {clip} "
            f"in L2, noise multiplier {p['noise_multiplier']:.6g}, sampling rate {p['sampling_rate']:.4g}, accounted "
            "as Poisson sampling). The client-specific parts that never leave a client (Pilot's client adapter, "
            "FedDPA's local LoRA) are outside this guarantee.\n")


def write_outputs(history: list[dict], cfg) -> dict[str, str]:
    out = cfg.run.output_dir
    os.makedirs(out, exist_ok=True)
    paths = {"metrics": os.path.join(out, "metrics.json"), "results": os.path.join(out, "results.md"),
             "plot": os.path.join(out, "metrics.png")}
    doc = metrics_document(history, cfg)
    tmp = paths["metrics"] + ".tmp"
    with open(tmp, "w") as fh:
        jsonout.dump(doc, fh, indent=1)
    os.replace(tmp, paths["metrics"])
    table = results_table(history)
    with open(paths["results"], "w") as fh:
        fh.write(f"# {cfg.fl.strategy}: per-client results ({cfg.fl.num_clients} clients, {cfg.fl.rounds} rounds)\n\n")
        fh.write(table + "\n")
        fh.write(privacy_note(history))
    plot(history, paths["plot"], f"{cfg.fl.strategy}: per-client metric per round")
    return paths


# ---------------------------------------------------------------- across runs


def _task_curve(doc: dict, task: str) -> list[float]:
    return [float(np.mean([c["value"] for c in r["clients"] if c["task"] == task])) for r in doc["rounds"]]


# "±" in comparison tables: the population standard deviation over the runs (denominator
# n), the convention of every table written so far; tools/study states it under its table.
SD_CONVENTION = "± is the population standard deviation over the runs (denominator n)"


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.1f}" if len(values) == 1 else f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def comparison_table(groups: dict[str, list[dict]], per_client: bool = True) -> str:
    """Each group's final values, mean ± population sd over its runs: every client's
    (unless per_client is False: a 36-client study reads better by its task averages)
    and each task's average."""
    first = next(doc for docs in groups.values() for doc in docs)
    clients = first["final"]
    tasks = list(dict.fromkeys(c["task"] for c in clients))
    shown = clients if per_client else []
    header = (["method", "runs"] + [f"c{c['client']} {c['task']}" for c in shown]
              + [f"avg {t} ({METRIC_LABEL.get(next(c['metric'] for c in clients if c['task'] == t), t)})"
                 for t in tasks])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, docs in groups.items():
        if not docs:
            lines.append(f"| {label} | 0 |" + " |" * (len(header) - 2))
            continue
        per_client = [_cell([d["final"][i]["value"] for d in docs]) for i in range(len(shown))]
        per_task = [_cell([float(np.mean([c["value"] for c in d["final"] if c["task"] == t])) for d in docs])
                    for t in tasks]
        lines.append("| " + " | ".join([label, str(len(docs))] + per_client + per_task) + " |")
    return "\n".join(lines)


def comparison_plot(groups: dict[str, list[dict]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(doc for docs in groups.values() for doc in docs)
    tasks = list(dict.fromkeys(c["task"] for c in first["final"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label, docs in groups.items():
            if not docs:
                continue
            curves = np.array([_task_curve(d, task) for d in docs])
            rounds = [r["round"] for r in docs[0]["rounds"]]
            mean, std = curves.mean(axis=0), curves.std(axis=0)
            ax.plot(rounds, mean, marker="o", label=label)
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.15)
        metric = next(c["metric"] for c in first["final"] if c["task"] == task)
        ax.set_title(f"{task} ({METRIC_LABEL.get(metric, metric)} x100)")
        ax.set_xlabel("round")
        ax.set_xticks([r["round"] for r in first["rounds"]])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("task average (mean ± std over runs)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
