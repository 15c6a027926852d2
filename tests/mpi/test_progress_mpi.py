"""A real 3-rank run whose log shows every rank's client progress lines (ranks other than
0 log at WARNING otherwise)."""

import os
import re

from helpers import SMOKE, run_main, small_overrides


def test_every_rank_logs_its_clients_progress(small_world, cache_dir, tmp_path):
    """3 ranks, one client each, a line every step: training and evaluation lines of every
    client, with the rank's prefix on ranks 1 and 2."""
    out = str(tmp_path / "run")
    proc = run_main(["--config", SMOKE] + small_overrides(cache_dir, out) + ["run.log_every=1"], np=3, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for k in range(3):
        prefix = r"\[pilot_hpc\]" if k == 0 else rf"\[pilot_hpc rank {k}\]"
        for step in (1, 2, 3):  # train.max_steps=3
            assert re.search(rf"{prefix} round 2 client {k} step {step}/3 \| ce [\d.]+ .*\| lr 0.0005 \| "
                             r"[\d.]+ samples/s \d+ tokens/s \| ETA client \S+ rank \S+ \| rss ", proc.stdout), k
        assert re.search(rf"{prefix} eval client {k} batch 1/1 \|", proc.stdout), k
    assert "\r" not in proc.stdout
    assert os.path.isfile(os.path.join(out, "metrics.json"))
