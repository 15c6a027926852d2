"""TensorBoard's per-step lr follows the schedule the engines set (not the base lr)."""

import math

import pytest
import torch

from pilot_hpc.train.schedule import set_lr
from pilot_hpc.train.spec import TrainSpec


def test_lr_at_is_what_the_engines_set():
    spec = TrainSpec(lr=1e-3, batch_size=4, epochs=1, seed=0, lr_schedule="cosine", warmup_ratio=0.25)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=spec.lr)
    for step in range(8):
        set_lr(opt, spec.lr, step, 8, spec.lr_schedule, spec.warmup_ratio)
        assert spec.lr_at(step, 8) == opt.param_groups[0]["lr"]


def test_board_writes_the_scheduled_lr(tmp_path):
    pytest.importorskip("tensorboard")
    from pilot_hpc.tensorboard import STEPS_PER_ROUND, Board, read_scalars

    spec = TrainSpec(lr=1e-3, batch_size=4, epochs=1, seed=0, lr_schedule="cosine", warmup_ratio=0.25)
    trace = [[s, 1.0, math.nan, math.nan, math.nan, math.nan, 0.5] for s in range(1, 5)]  # 4 steps, from 1
    board = Board(str(tmp_path))
    board.log_round(2, [], {}, {0: trace}, None, 1.0, lr=lambda step, total: spec.lr_at(step - 1, total),
                    batch_size=4)
    board.close()
    got = dict(read_scalars(str(tmp_path))["client_00/lr"])
    want = {STEPS_PER_ROUND + s: spec.lr_at(s - 1, 4) for s in range(1, 5)}
    assert set(got) == set(want)
    for step, value in want.items():
        assert got[step] == pytest.approx(value, rel=1e-6)  # event files store float32
    assert len(set(got.values())) > 1  # warm-up then decay: not one constant rate
