"""Progress lines: their numbers from a fake clock (the 3-rank run: tests/mpi)."""

import logging
import re

from pilot_hpc import progress
from pilot_hpc.errors import DataError
from pilot_hpc.progress import EvalProgressLog, TrainProgressLog, fmt_duration, samples_after, steps_after


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_durations_read_as_seconds_minutes_hours():
    assert [fmt_duration(s) for s in (0, 12.4, 185, 7620)] == ["0s", "12s", "3m05s", "2h07m"]
    assert fmt_duration(float("nan")) == "?"


def test_samples_count_the_short_last_batch_of_each_epoch():
    # n = 10 at batch 4: batches of 4, 4, 2 per epoch
    assert [samples_after(s, 10, 4) for s in range(7)] == [0, 4, 8, 10, 14, 18, 20]


def test_train_line_rates_and_etas_from_the_step_time():
    clock = Clock()
    hook = TrainProgressLog(round_=2, client=5, steps=10, n=80, batch_size=8, every=2, lr=lambda step: 2e-5,
                            later_steps=5, tokens_per_sample=100.0, clock=clock, memory=lambda: "rss 1.00 GiB")
    clock.now += 4.0  # 2 s per step
    line = hook.line(2, {"ce": 1.25, "diff": 0.5})
    # 16 samples in 4 s; 8 steps left at 2 s = 16 s; with the 5 steps of later clients 26 s
    assert line == ("round 2 client 5 step 2/10 | ce 1.2500 diff 0.5000 | lr 2e-05 | 4.00 samples/s 400 tokens/s | "
                    "ETA client 16s rank 26s | rss 1.00 GiB")
    assert "| lr 0.001 |" in hook.line(2, {"ce": 1.0, "lr": 1e-3})  # a scheduled lr in the terms wins


def test_resumed_round_rates_count_only_the_new_steps():
    clock = Clock()
    hook = TrainProgressLog(round_=1, client=0, steps=10, n=80, batch_size=8, every=1, lr=lambda step: 1.0,
                            clock=clock, memory=lambda: "", first_step=6)
    clock.now += 2.0
    assert "4.00 samples/s | ETA client 6s rank 6s" in hook.line(7, {"ce": 1.0})  # 1 step, 8 samples, 2 s


def test_train_lines_every_n_steps(caplog):
    hook = TrainProgressLog(round_=1, client=0, steps=5, n=40, batch_size=8, every=2, lr=lambda step: 1.0,
                            memory=lambda: "")
    with caplog.at_level(logging.INFO, logger="pilot_hpc.progress"):
        for step in range(1, 6):
            hook(step, {"ce": 1.0})
    assert [re.search(r"step (\d+)/5", r.message).group(1) for r in caplog.records] == ["2", "4"]


def test_eval_line_eta():
    clock = Clock()
    hook = EvalProgressLog(client=3, every=1, clock=clock)
    clock.now += 30.0
    assert hook.line(3, 12).startswith("eval client 3 batch 3/12 | 30s elapsed, ETA 1m30s | rss ")


def test_steps_after_counts_the_clients_still_to_train():
    jobs = [("a", range(10)), ("b", range(20)), ("c", range(30))]
    assert steps_after(jobs, "a", lambda n: n // 10) == 5
    assert steps_after(jobs, "c", lambda n: n // 10) == 0


def test_progress_logger_shows_where_the_root_logger_is_at_warning():
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.WARNING)  # what main.setup_logging does on ranks other than 0
    try:
        assert progress.log.isEnabledFor(logging.INFO)
        assert not logging.getLogger("pilot_hpc.fl").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(old)
    assert progress.resident_bytes() > 2 ** 20


def test_tokens_per_sample_estimate_or_none():
    class Fake:
        def __init__(self, lengths, bad=False):
            self.lengths, self.bad = lengths, bad

        def __len__(self):
            return len(self.lengths)

        def encode_train(self, i):
            if self.bad:
                raise DataError("sample 0: too long")
            return [0] * self.lengths[i], []

    assert progress.tokens_per_sample(Fake([10, 20, 30]), k=2) == 15.0
    assert progress.tokens_per_sample(Fake([10], bad=True)) is None
    assert progress.tokens_per_sample([{"input_ids": [1]}]) is None  # no encode_train: samples/s only
