"""Partial participation under real mpiexec: per-round sampling (fl.clients_per_round) gives
the same run for W = 1 and W = 3 and after a preemption mid-round; clients that sit a
round out receive what every client receives (docs/method.md, partial participation)."""

import os

import pytest
import torch

from helpers import args_for, load_metrics, run_main
from pilot_hpc import checkpoint
from pilot_hpc.config import load_config
from pilot_hpc.fl import participation

from helpers import SMOKE, small_overrides

SAMPLING = ["fl.rounds=3", "fl.clients_per_round=2"]


def _selection(cache_dir, out, extra):
    cfg = load_config(SMOKE, small_overrides(cache_dir, str(out)) + extra)
    return {r: participation.selected(cfg, r).nonzero().flatten().tolist() for r in range(1, cfg.fl.rounds + 1)}


@pytest.fixture(scope="module")
def sampled(small_world, cache_dir, tmp_path_factory):
    """The sampled run with W = 3 (chunked), and with W = 1 preempted in round 2 (SIGTERM
    mid-step) then resumed: equal, they show both guarantees at once."""
    out = tmp_path_factory.mktemp("sampled")
    args = args_for(cache_dir, out / "w1") + SAMPLING
    stopped = run_main(args, timeout=600, env={"PILOT_HPC_INJECT": "sigterm:rank=0,round=2,step=2"})
    assert stopped.returncode == 75, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    one = run_main(args, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "interrupted mid-round" in one.stdout
    three = run_main(args_for(cache_dir, out / "w3") + SAMPLING + ["fl.chunk_mb=0.0625"], np=3, timeout=600)
    assert three.returncode == 0, three.stdout[-3000:] + three.stderr[-3000:]
    return out, one, three


def test_sampling_is_the_same_on_one_and_three_ranks_and_after_a_resume_bitwise(sampled, cache_dir):
    out, one, three = sampled
    w1, w3 = load_metrics(out / "w1"), load_metrics(out / "w3")
    assert w1["rounds"] == w3["rounds"] and w1["final"] == w3["final"]
    chosen = _selection(cache_dir, out, SAMPLING)
    assert any(len(c) < 3 for c in chosen.values())
    for entry in w3["rounds"][1:]:
        took = [c["client"] for c in entry["clients"] if c["participation"] == "participated"]
        assert took == chosen[entry["round"]], (entry["round"], took)
        for c in entry["clients"]:
            if c["participation"] == "not_selected":  # no stale losses of an older round
                assert c["steps"] == 0 and c["ce"] != c["ce"], c  # null in the file: NaN read back
        line = f"round {entry['round']}/3"
        assert f"took part: 2/3 clients {took}" in [ln for ln in (three.stdout + three.stderr).splitlines() if line in ln][0]
    assert "participation" not in w3["rounds"][0]["clients"][0]  # round 0 trains nobody
    # The traffic files: K = W = 3, so rank r hosts client r. In a round where its client
    # was not selected, a rank sends nothing to the server (no samples row, no update).
    import json

    for rank in range(3):
        log = json.loads((out / "w3" / "traffic" / f"rank_{rank:03d}.json").read_text())
        starts = [i for i, t in enumerate(log) if t["tag"] == "stop"]  # one stop vote per round
        for r, (a, b) in enumerate(zip(starts, starts[1:] + [len(log)]), start=1):
            sent = sum(t["sent"] for t in log[a:b] if t["tag"] in ("num_samples", "gram", "update"))
            if rank != 0:  # rank 0 is the server: its own rows never leave it
                assert (sent > 0) == (rank in chosen[r]), (rank, r, sent)


def test_fedavg_clients_that_sat_out_hold_the_global_model(small_world, cache_dir, tmp_path):
    extra = SAMPLING + ["fl.strategy=fedavg", "fl.sampling=stratified"]
    run = tmp_path / "fedavg"
    proc = run_main(args_for(cache_dir, run) + extra, np=3, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    chosen = _selection(cache_dir, run, extra)
    ck = checkpoint.read(str(run / "checkpoints" / "round_003.h5"))
    out_ = [k for k in range(3) if k not in chosen[3]]
    assert out_
    states = {k: ck.clients[k].state for k in range(3)}
    trained = [key for key in states[0] if key.startswith("lora.") or key.startswith("connector.task_adapter.")]
    assert trained
    for key in trained:  # everyone, the one that sat the last round out too, ends on the global model
        for k in range(1, 3):
            assert torch.equal(states[0][key], states[k][key]), (key, k)


def test_a_client_that_raises_is_excluded_once_and_the_run_goes_on(small_world, cache_dir, tmp_path):
    """fl.on_client_error=exclude: the injected error of client 1 in round 2 drops it from
    that round only, named in the log and in metrics.json, at its round-start state."""
    run = tmp_path / "exclude"
    proc = run_main(args_for(cache_dir, run) + ["fl.on_client_error=exclude"], np=3, timeout=600,
                    env={"PILOT_HPC_INJECT": "raise:client=1,round=2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert text.count("client 1: RuntimeError: injected failure (PILOT_HPC_INJECT) in client 1, round 2 in round 2: "
                      "dropped") == 1, text[-3000:]
    assert "client(s) [1] excluded from aggregation" in text
    doc = load_metrics(run)
    status = {e["round"]: [c["participation"] for c in e["clients"]] for e in doc["rounds"][1:]}
    assert status == {1: ["participated"] * 3, 2: ["participated", "dropped", "participated"]}, status
    row = doc["rounds"][2]["clients"][1]
    assert row["error"].startswith("RuntimeError: injected failure") and row["steps"] == 0 and row["ce"] != row["ce"]
    before = checkpoint.read(str(run / "checkpoints" / "round_001.h5")).clients[1].state
    after = checkpoint.read(str(run / "checkpoints" / "round_002.h5")).clients[1].state
    for key in before:  # Pilot: a dropped client installs nothing, as an excluded one
        assert torch.equal(before[key], after[key]), key


def test_a_tiny_local_time_budget_cuts_every_round_to_its_first_step(small_world, cache_dir, tmp_path):
    """train.max_local_seconds: each client stops when its budget is spent (here after the
    first step, which always runs), says so, and its update weighs the samples it saw."""
    run = tmp_path / "budget"
    proc = run_main(args_for(cache_dir, run) + ["train.max_local_seconds=1e-6"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert text.count("train.max_local_seconds=1e-06 reached after 1 of 3 steps") == 6, text[-3000:]  # 3 clients x 2 rounds
    assert "counts with the 8 samples it saw" in text  # train.batch_size=8
    doc = load_metrics(run)
    assert all(c["steps"] == 1 for e in doc["rounds"][1:] for c in e["clients"])


def test_evaluation_every_other_round_of_the_participants_only(small_world, cache_dir, tmp_path):
    """fl.eval_every=2, fl.eval_clients=participants: round 1 evaluates nobody, round 2 its
    participants, the last round everyone; unevaluated rows hold null values, said so, and
    write no predictions."""
    extra = SAMPLING + ["fl.eval_every=2", "fl.eval_clients=participants"]
    run = tmp_path / "eval"
    proc = run_main(args_for(cache_dir, run) + extra, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = load_metrics(run)
    chosen = _selection(cache_dir, run, extra)
    # load_metrics reads null (no value) back as NaN: a value is there when it equals itself.
    values = {e["round"]: [c["value"] == c["value"] for c in e["clients"]] for e in doc["rounds"]}
    assert values[0] == values[3] == [True] * 3 and values[1] == [False] * 3
    assert [k for k, v in enumerate(values[2]) if v] == chosen[2]
    for e in doc["rounds"]:
        for c in e["clients"]:
            assert c.get("evaluated", True) == (c["value"] == c["value"])
            assert (run / "predictions" / f"round_{e['round']:03d}" / f"client_{c['client']:02d}.jsonl").exists() \
                == (c["value"] == c["value"])


def test_client_state_on_disk_gives_the_same_run_and_resumes_bitwise(sampled, cache_dir, tmp_path):
    """fl.client_state=disk: the states wait in per-rank files; a sampled W = 3 run is
    bitwise the in-memory one, also when preempted mid-round and resumed."""
    out, _, _ = sampled
    chosen = _selection(cache_dir, out, SAMPLING)
    run = tmp_path / "disk"
    args = args_for(cache_dir, run) + SAMPLING + ["fl.chunk_mb=0.0625", "fl.client_state=disk"]
    proc = run_main(args, np=3, timeout=300, env={"PILOT_HPC_INJECT": f"sigterm:rank={chosen[2][-1]},round=2,step=2"})
    assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(os.listdir(run / "client_state")) == ["rank_000", "rank_001", "rank_002"]
    again = run_main(args, np=3, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    ref, got = load_metrics(out / "w3"), load_metrics(run)
    assert got["rounds"] == ref["rounds"] and got["final"] == ref["final"]
    assert any(n.endswith(".state.safetensors") for n in os.listdir(run / "client_state" / "rank_001"))
