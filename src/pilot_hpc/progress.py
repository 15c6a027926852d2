"""Progress lines of local training and evaluation: plain text, one line per report, no
carriage returns (Slurm log friendly), through the `pilot_hpc.progress` logger.

Every rank logs its own clients' lines. main.setup_logging puts ranks other than 0 at
WARNING (their round chatter would repeat rank 0's), so this logger is set to INFO
itself: a rank's client lines reach its handler (prefixed `[pilot_hpc rank R]`) while
the rest of that rank's INFO stays quiet.

What a line says and where it comes from:
  round, client, step / steps   the trainer's Hooks.progress(step, terms) and TrainSpec.steps(n)
  loss terms                    that step's terms (ce and the weighted auxiliary ones)
  lr                            terms["lr"] when an engine puts it there, else the `lr(step)`
                                callable the caller passes (spec.lr for a constant schedule;
                                a schedule's lr_at(step) when it has one)
  samples/s, tokens/s           samples from the step count and batch size; tokens/s only
                                when the caller gives tokens per sample (an estimate from a
                                few tokenised samples: the hook does not see the batch)
  ETA client / ETA rank         this client's remaining steps, and those plus the steps of
                                the clients this rank trains after it in the round, at the
                                mean step time so far
  mem                           peak CUDA memory allocated on a CUDA device, else this
                                process's resident set (VmRSS)

This module imports nothing of pilot_hpc: the federation builds the reporters and hands
them to the trainer as a hook and to the evaluation as a callback.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

from pilot_hpc.errors import DataError

log = logging.getLogger("pilot_hpc.progress")
log.setLevel(logging.INFO)


def fmt_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m; '?' before there is a rate to extrapolate from."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def resident_bytes() -> int:
    """This process's resident set now (VmRSS); the peak from getrusage where /proc is absent."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def memory_text(device=None) -> str:
    """'cuda peak 12.3 GiB' on a CUDA device, else 'rss 1.2 GiB'."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return f"cuda peak {fmt_bytes(torch.cuda.max_memory_allocated(device))}"
    return f"rss {fmt_bytes(resident_bytes())}"


def samples_after(step: int, n: int, batch_size: int) -> int:
    """Samples seen after `step` steps over epochs of n samples (the last batch of an epoch is short)."""
    per_epoch = math.ceil(n / batch_size)
    epochs, within = divmod(step, per_epoch)
    return epochs * n + min(within * batch_size, n)


def tokens_per_sample(dataset, k: int = 8) -> float | None:
    """Mean prompt + answer tokens of the first k samples (tokenised, no image read), or
    None for a dataset that cannot say (then the lines give samples/s only)."""
    encode = getattr(dataset, "encode_train", None)
    if encode is None or len(dataset) == 0:
        return None
    idx = range(min(k, len(dataset)))
    try:
        return sum(len(encode(i)[0]) for i in idx) / len(idx)
    except DataError:  # an over-long sample: training reports it, with its id, when it reaches it
        return None


def steps_after(jobs: list, current, steps: Callable[[int], int]) -> int:
    """Steps of the jobs (client, dataset) that follow `current` in this rank's round."""
    clients = [job[0] for job in jobs]
    if current not in clients:
        return 0
    return sum(steps(len(dataset)) for _, dataset in jobs[clients.index(current) + 1:])


class TrainProgressLog:
    """The Hooks.progress of one client's local round: a line every `every` steps."""

    def __init__(self, *, round_: int, client: int, steps: int, n: int, batch_size: int, every: int,
                 lr: Callable[[int], float], later_steps: int = 0, tokens_per_sample: float | None = None,
                 device=None, clock: Callable[[], float] = time.perf_counter, memory: Callable[[], str] | None = None,
                 first_step: int = 0):
        """later_steps: steps of the clients this rank trains after this one in the round;
        first_step: the step a resumed round continues from (the rate counts only new steps)."""
        self.round, self.client, self.steps, self.n = round_, client, steps, n
        self.batch_size, self.every, self.lr = batch_size, max(1, every), lr
        self.later_steps, self.tokens = later_steps, tokens_per_sample
        self.clock = clock
        self.memory = memory or (lambda: memory_text(device))
        self.first_step = first_step
        self.t0 = clock()

    def line(self, step: int, terms: dict) -> str:
        elapsed = max(self.clock() - self.t0, 1e-9)
        done = step - self.first_step
        per_step = elapsed / done if done > 0 else float("nan")
        samples = samples_after(step, self.n, self.batch_size) - samples_after(self.first_step, self.n,
                                                                                self.batch_size)
        rate = samples / elapsed
        lr = float(terms["lr"]) if "lr" in terms else self.lr(step)
        losses = " ".join(f"{k} {float(v):.4f}" for k, v in terms.items() if k != "lr")
        speed = f"{rate:.2f} samples/s" + (f" {rate * self.tokens:.0f} tokens/s" if self.tokens else "")
        left = self.steps - step
        return (f"round {self.round} client {self.client} step {step}/{self.steps} | {losses} | lr {lr:.3g} | "
                f"{speed} | ETA client {fmt_duration(left * per_step)} rank "
                f"{fmt_duration((left + self.later_steps) * per_step)} | {self.memory()}")

    def __call__(self, step: int, terms: dict) -> None:
        if step % self.every == 0:
            log.info("%s", self.line(step, terms))


class EvalProgressLog:
    """The evaluation's callback(batch, batches): a line every `every` generation batches."""

    def __init__(self, *, client: int, every: int, device=None, clock: Callable[[], float] = time.perf_counter):
        self.client, self.every, self.device, self.clock = client, max(1, every), device, clock
        self.t0 = clock()

    def line(self, batch: int, batches: int) -> str:
        elapsed = self.clock() - self.t0
        eta = (batches - batch) * elapsed / batch if batch else float("nan")
        return (f"eval client {self.client} batch {batch}/{batches} | {fmt_duration(elapsed)} elapsed, "
                f"ETA {fmt_duration(eta)} | {memory_text(self.device)}")

    def __call__(self, batch: int, batches: int) -> None:
        if batch % self.every == 0:
            log.info("%s", self.line(batch, batches))
