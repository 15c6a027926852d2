"""The update's path through a whole run: a transform named in the config encodes each
part of each participant's update once per round on the client, and decodes each part
once per round on the server."""

import collections
import json
import os

from helpers import args_for, run_main


def test_a_transform_from_the_config_runs_once_per_part_per_round(cache_dir, tmp_path):
    probe = tmp_path / "calls.jsonl"
    out = tmp_path / "run"
    env = {"TRANSFORM_PROBE": str(probe),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    # FedAvg: one pass per part (ATA decodes the personal part once more, for its Gram pass).
    proc = run_main(args_for(cache_dir, out) + ["fl.strategy=fedavg", "fl.chunk_mb=0",
                                                "fl.transforms=[transform_probe:CountingTransform]"],
                    np=3, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    calls = [json.loads(line) for line in probe.read_text().splitlines()]
    encodes = collections.Counter((c["round"], c["client"], c["part"]) for c in calls if c["call"] == "encode")
    assert encodes == {(r, k, p): 1 for r in (1, 2) for k in range(3) for p in ("shared_by_task", "personal")}
    decodes = collections.Counter(c["part"] for c in calls if c["call"] == "decode")
    assert decodes == {"shared_by_task": 2, "personal": 2}  # two rounds, one chunk per part
    assert all(c["rows"] == 3 for c in calls if c["call"] == "decode")  # every client's row, on rank 0


def test_a_transform_that_needs_the_round_start_sees_what_each_client_installed(cache_dir, tmp_path):
    """FedAvg: every client starts a round from the same global model, so the start rows of
    a round agree across clients (and ranks), differ between rounds, and training moved
    every client away from them."""
    probe = tmp_path / "calls.jsonl"
    env = {"TRANSFORM_PROBE": str(probe),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    proc = run_main(args_for(cache_dir, tmp_path / "run") + ["fl.strategy=fedavg",
                                                              "fl.transforms=[transform_probe:DeltaProbe]"],
                    np=3, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in probe.read_text().splitlines()]
    assert {(r["round"], r["client"], r["part"]) for r in rows} == {
        (r, k, p) for r in (1, 2) for k in range(3) for p in ("shared_by_task", "personal")}
    for part in ("shared_by_task", "personal"):
        starts = {r["round"]: set() for r in rows}
        for r in rows:
            if r["part"] == part:
                starts[r["round"]].add(tuple(r["start"]))
                assert r["change"] > 0
        assert all(len(s) == 1 for s in starts.values()), starts  # one global start per round
        assert starts[1] != starts[2]


def test_an_unknown_transform_is_a_config_error_before_training(tmp_path, cache_dir):
    proc = run_main(args_for(cache_dir, tmp_path / "x") + ["fl.transforms=[no_such_module:Nope]"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fl.transforms: cannot load 'no_such_module:Nope'" in proc.stderr


def test_seen_and_unseen_items_are_scored_apart_and_interim_rounds_score_fewer(cache_dir, tmp_path):
    """data.unseen_combos (the second research world's knob) on the small world: each
    client's metric for the items its task trained on and for those it did not, in
    metrics.json and in the predictions; rounds before the last score the first items."""
    from helpers import load_metrics

    out = tmp_path / "combos"
    proc = run_main(args_for(cache_dir, out) + [
        "data.unseen_combos=latin3", "data.eval_subsets=[seen, unseen]", "data.eval_split=task",
        "data.eval_samples=36", "data.eval_interim_samples=12", "fl.rounds=1"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = load_metrics(out)
    for row in doc["final"]:
        lines = [json.loads(x) for x in (out / "predictions" / "round_001" / f"client_{row['client']:02d}.jsonl")
                 .read_text().splitlines()]
        assert len(lines) == 36 and {x["subset"] for x in lines} == {"seen", "unseen"}
        for name in ("seen", "unseen"):
            scores = [x["score"] for x in lines if x["subset"] == name]
            assert row[f"value_{name}"] == round(100 * sum(scores) / len(scores), 4)
    first = (out / "predictions" / "round_000" / "client_00.jsonl").read_text().splitlines()
    assert len(first) == 12  # the interim round scored the first 12 items
