"""Client groups (run.ranks_per_client > 1) and the DeepSpeed engine in whole runs.

`mpiexec -n 4` with ranks_per_client = 2 makes 2 client hosts of 2 ranks each; every
rank trains (data-parallel inside its client through DeepSpeed), only the group leaders
exchange, evaluate and checkpoint, and the members take their leader's states.
"""

import json
import math

from helpers import SMOKE, load_metrics, run_main
from pilot_hpc import checkpoint

TWO_CLIENTS = ["fl.num_clients=2", "fl.client_tasks=[vqa, caption]", "fl.task_metrics={vqa: vqa_accuracy, caption: cider}",
               "pilot.top_m=1", "fl.rounds=2", "data.train_min=24", "data.train_max=40", "data.eval_samples=6",
               "pretrain.steps=10", "pretrain.samples=60", "train.max_steps=3", "train.batch_size=8",
               "train.eval_batch_size=8", "train.max_new_tokens=12"]


def test_two_ranks_per_client_run_two_clients(cache_dir, tmp_path):
    out = tmp_path / "groups"
    args = ["--config", SMOKE, f"run.cache_dir={cache_dir}", f"run.output_dir={out}", *TWO_CLIENTS,
            "train.engine=deepspeed", "run.ranks_per_client=2"]
    proc = run_main(args, np=4, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 clients on 4 rank(s) (2 rank(s) per client)" in proc.stdout
    final = load_metrics(out)["final"]
    assert [c["client"] for c in final] == [0, 1]
    assert all(math.isfinite(c["value"]) and math.isfinite(c["ce"]) and c["steps"] == 3 for c in final)
    ck = checkpoint.read(str(out / "checkpoints" / "round_002.h5"))
    assert sorted(ck.clients) == [0, 1]  # written by the two leaders
    tags = {}
    for rank in range(4):
        with open(out / "traffic" / f"rank_{rank:03d}.json") as fh:
            tags[rank] = {t["tag"] for t in json.load(fh)}
    for leader in (0, 2):  # the federation's ranks
        assert {"update", "shared", "personal", "metrics", "group_state"} <= tags[leader]
    for member in (1, 3):  # train, vote on stops and take the leader's states; nothing else
        assert tags[member] == {"all_ok", "stop", "group_start", "group_state"}, tags[member]


def test_ranks_that_do_not_split_into_groups_are_refused(cache_dir, tmp_path):
    args = ["--config", SMOKE, f"run.cache_dir={cache_dir}", f"run.output_dir={tmp_path / 'bad'}", *TWO_CLIENTS,
            "train.engine=deepspeed", "run.ranks_per_client=2"]
    proc = run_main(args, np=3, timeout=300)
    assert proc.returncode == 2
    assert "do not split into client groups of run.ranks_per_client=2" in proc.stderr
