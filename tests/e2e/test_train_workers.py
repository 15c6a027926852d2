"""Whole runs: DataLoader workers (data.num_workers) do not change results.

The small federation at W = 1 with the batches loaded on the training thread and by
2 worker processes: metrics.json's `final` and `rounds` must be bitwise equal (LoRA
dropout is on in the smoke config, so a worker set-up that touched torch's global RNG
would show here).
"""

from __future__ import annotations

import json

from helpers import SMOKE, load_metrics, run_main, small_overrides


def test_workers_give_bitwise_the_same_run(small_world, cache_dir, tmp_path):
    out = {}
    for workers in (0, 2):
        folder = tmp_path / f"workers{workers}"
        proc = run_main(["--config", SMOKE] + small_overrides(cache_dir, str(folder)) +
                        [f"data.num_workers={workers}"], timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[workers] = load_metrics(folder)
    # json.dumps compares floats by their exact repr and NaN (absent losses) as "NaN".
    for key in ("final", "rounds"):
        assert json.dumps(out[2][key]) == json.dumps(out[0][key]), key
    assert out[0]["final"][0]["steps"] > 0
