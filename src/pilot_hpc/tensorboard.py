"""Run logging for dashboards: TensorBoard event files (and Weights & Biases when asked).

The only importer of tensorboard (through torch.utils.tensorboard) and of wandb, both
lazily: a run with run.tensorboard=false never loads them. Rank 0 alone writes; the
other ranks' numbers reach it with the round's statistics (Federation.gather_traces),
so there is one event file per run, not one per rank.

Tags:
  client_KK/loss/<term>      per local step (global step = (round - 1) * 100000 + step)
  client_KK/lr (as the schedule set it), client_KK/samples_per_s (batch_size / step seconds)
  client_KK/<metric>         per round, the client's metric (percent, as in metrics.json)
  task/<task>                per round, the mean over the task's clients
  exchange/bytes, exchange/seconds   per round, rank 0's exchange traffic and time
  round/seconds
"""

from __future__ import annotations

import logging
import math
import os

log = logging.getLogger("pilot_hpc.tensorboard")

# A local round has fewer steps than this, so step scalars of consecutive rounds do not
# overlap on one axis (the paper's 7B setting runs about 1000 steps a round).
STEPS_PER_ROUND = 100_000
TRACE_TERMS = ("ce", "diff", "balance", "z", "prox")


class Board:
    """Scalars of one run: TensorBoard, plus wandb when run.wandb_project is set."""

    def __init__(self, folder: str, wandb_project: str = "", config: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.writer = SummaryWriter(log_dir=folder)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("run.wandb_project=%s but wandb is not installed: TensorBoard only", wandb_project)
            else:
                self.wandb = wandb.init(project=wandb_project, config=config or {}, dir=folder)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        self.writer.add_scalar(tag, float(value), step)
        if self.wandb is not None:
            self.wandb.log({tag: float(value), "step": step})

    def log_round(self, round_: int, rows: list[dict], by_task: dict[str, float], traces: dict, exchange,
                  seconds: float, *, lr, batch_size: int, codec: dict | None = None) -> None:
        """traces: {client: [[step, ce, diff, balance, z, prox, seconds], ...]} of this round
        (one row per step of the client's round); exchange: (bytes, seconds) of rank 0's
        exchange, or None (round 0, no exchange); lr(step, total): the scheduled rate;
        codec: metrics.json's "bytes" of the round (fl/coded.py:round_entry), or None."""
        for k, trace in sorted(traces.items()):
            for row in trace:
                if math.isnan(row[0]):  # a step taken before a restart: no trace of it
                    continue
                step = (round_ - 1) * STEPS_PER_ROUND + int(row[0])
                for term, value in zip(TRACE_TERMS, row[1:1 + len(TRACE_TERMS)]):
                    self.scalar(f"client_{k:02d}/loss/{term}", float(value), step)
                self.scalar(f"client_{k:02d}/lr", lr(int(row[0]), len(trace)), step)
                if row[-1] > 0:
                    self.scalar(f"client_{k:02d}/samples_per_s", batch_size / float(row[-1]), step)
        for row in rows:
            self.scalar(f"client_{row['client']:02d}/{row['metric']}", row["value"], round_)
            if "participation" in row:  # 1: its update was aggregated this round; 0: sat out, excluded or dropped
                self.scalar(f"client_{row['client']:02d}/took_part", float(row["participation"] == "participated"),
                            round_)
        took = [r for r in rows if "participation" in r]
        if took:
            self.scalar("round/participants", float(sum(r["participation"] == "participated" for r in took)), round_)
        for task, value in by_task.items():
            self.scalar(f"task/{task}", value, round_)
        if exchange is not None:
            self.scalar("exchange/bytes", float(exchange[0]), round_)
            self.scalar("exchange/seconds", float(exchange[1]), round_)
        if codec is not None:  # a lossy fl.codec: one client's bytes this round and the ratios vs float32
            for key in ("up", "down", "ratio_up", "ratio_down"):
                self.scalar(f"exchange/client_{key}" if key in ("up", "down") else f"exchange/{key}",
                            float(codec[key]), round_)
        self.scalar("round/seconds", seconds, round_)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def open_board(cfg) -> Board | None:
    """Rank 0's Board for the run, or None with run.tensorboard=false (wandb logging,
    when asked for, rides along with TensorBoard's)."""
    if not cfg.run.tensorboard:
        return None
    return Board(os.path.join(cfg.run.output_dir, "tensorboard"), cfg.run.wandb_project, cfg.to_dict())


def read_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files under folder (tensorboard's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(folder)):
        if "tfevents" not in name:
            continue
        acc = EventAccumulator(os.path.join(folder, name), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out
