"""Comparison across runs (methods x seeds): the paper-shaped table and a per-round plot.

Input: {group label: [metrics.json documents of that group's runs (e.g. its seeds)]}.
Output: Markdown with one row per group, its per-client final metric and per-task
averages as mean +- std over the group's runs, and a PNG with one panel per task
showing the task-average metric per round for every group.
"""

from __future__ import annotations

import numpy as np

from pilot_hpc.report import METRIC_LABEL


def _task_curve(doc: dict, task: str) -> list[float]:
    return [float(np.mean([c["value"] for c in r["clients"] if c["task"] == task])) for r in doc["rounds"]]


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.1f}" if len(values) == 1 else f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def comparison_table(groups: dict[str, list[dict]]) -> str:
    first = next(doc for docs in groups.values() for doc in docs)
    clients = first["final"]
    tasks = list(dict.fromkeys(c["task"] for c in clients))
    header = (["method", "runs"] + [f"c{c['client']} {c['task']}" for c in clients]
              + [f"avg {t} ({METRIC_LABEL.get(next(c['metric'] for c in clients if c['task'] == t), t)})"
                 for t in tasks])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, docs in groups.items():
        if not docs:
            lines.append(f"| {label} | 0 |" + " |" * (len(header) - 2))
            continue
        per_client = [_cell([d["final"][i]["value"] for d in docs]) for i in range(len(clients))]
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
