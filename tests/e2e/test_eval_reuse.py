"""fl.eval_reuse: a client whose hosted model and test items equal those of a client
evaluated before it on its rank takes that client's answers. Two FedAvg clients of one
task on one rank, scored on the task's shared split, hold the same global model after
every round: the run with reuse equals the run without it in every number and answer."""

import json
import os

from helpers import SMOKE, load_metrics, run_main, small_overrides


def _answers(run, round_, k):
    """A predictions file's rows without the two fields that name the client."""
    with open(os.path.join(run, "predictions", f"round_{round_:03d}", f"client_{k:02d}.jsonl")) as fh:
        return [{key: v for key, v in json.loads(line).items() if key not in ("model_id", "answer_id")} for line in fh]


def test_reused_answers_equal_generated_ones(small_world, cache_dir, tmp_path):
    args = ["--config", SMOKE] + small_overrides(cache_dir, "x") + [
        "fl.strategy=fedavg", "fl.num_clients=4", "fl.client_tasks=[vqa, vqa, caption, grounding]", "data.eval_split=task"]
    runs = {}
    for reuse in (True, False):
        runs[reuse] = str(tmp_path / f"reuse_{reuse}")
        proc = run_main(args + [f"run.output_dir={runs[reuse]}", f"fl.eval_reuse={str(reuse).lower()}"], timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        taken = proc.stdout.count("client 1: the same model and items as client 0, whose answers it takes")
        assert taken == (3 if reuse else 0)  # rounds 0, 1 and 2
        assert "client 2: the same model" not in proc.stdout  # other tasks: other items
        assert "client 3: the same model" not in proc.stdout
    with_, without = load_metrics(runs[True]), load_metrics(runs[False])
    assert with_["final"] == without["final"] and with_["rounds"] == without["rounds"]
    assert with_["config_hash"] != without["config_hash"]  # the key is recorded when off its default
    for round_ in (0, 1, 2):
        assert _answers(runs[True], round_, 1) == _answers(runs[False], round_, 1) == _answers(runs[True], round_, 0)
