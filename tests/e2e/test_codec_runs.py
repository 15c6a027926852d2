"""Lossy codecs in whole runs (fl.codec, fl/coded.py): the same numbers for any number of
ranks and across an interruption, and the encoded bytes in traffic/ and metrics.json.

Two mpiexec runs (np=3) share this module's fixture; the W = 1 runs are plain processes."""

import json

import pytest
import torch

from helpers import args_for, load_metrics, ok, run_main
from pilot_hpc.checkpoint import store

# Pilot (ATA's Gram pass decodes the personal part too), streamed in 16384-column chunks at W = 3.
INT8 = ["fl.codec=int8", "fl.chunk_mb=0.0625"]
# FedAdam's step on the mean change, int4 up and int8 back, a client sitting a round out
# (the global row travels to it too).
INT4 = ["fl.strategy=fedadam", "fl.codec=int4", "fl.codec_down=int8", "fl.clients_per_round=2"]


@pytest.fixture(scope="module")
def coded_runs(cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("codecs")
    out = {name: root / name for name in ("int8_w3", "int8_w1", "int8_resumed", "int4_w3", "int4_w1")}
    ok(run_main(args_for(cache_dir, out["int8_w3"]) + INT8, np=3, timeout=600))
    ok(run_main(args_for(cache_dir, out["int8_w1"]) + ["fl.codec=int8"], timeout=600))
    # Interrupted in round 2 (residuals of round 1 in the checkpoint), its clients' states on disk.
    resumed = args_for(cache_dir, out["int8_resumed"]) + ["fl.codec=int8", "fl.client_state=disk"]
    stopped = run_main(resumed, timeout=600, env={"PILOT_HPC_INJECT": "sigterm:rank=0,round=2,step=2"})
    assert stopped.returncode == 75, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    again = ok(run_main(resumed, timeout=600))
    assert "interrupted mid-round" in again.stdout
    w3 = ok(run_main(args_for(cache_dir, out["int4_w3"]) + INT4, np=3, timeout=600))
    (out["int4_w3"] / "log.txt").write_text(w3.stdout + w3.stderr)
    ok(run_main(args_for(cache_dir, out["int4_w1"]) + INT4, timeout=600))
    return out


def same_run(a, b):
    """Bitwise: the metrics of every round and every client's final state and residual."""
    ma, mb = load_metrics(a), load_metrics(b)
    assert ma["rounds"] == mb["rounds"] and ma["final"] == mb["final"]
    ca, cb = store.read(str(a / "checkpoints" / "round_002.h5")), store.read(str(b / "checkpoints" / "round_002.h5"))
    for k, rec in ca.clients.items():
        for key, t in rec.state.items():
            assert torch.equal(t, cb.clients[k].state[key]), (k, key)
        assert rec.residual is not None and sorted(rec.residual) == ["personal", "shared_by_task"]
        for part, t in rec.residual.items():
            assert torch.equal(t, cb.clients[k].residual[part]), (k, part)


def test_int8_gives_the_same_numbers_with_one_or_three_ranks_and_chunks(coded_runs):
    same_run(coded_runs["int8_w1"], coded_runs["int8_w3"])


def test_pilot_task_rows_stay_the_parameter_mix_when_sent_as_changes(coded_runs):
    """Every holder of task t's adapter (its own clients, and the others as foreign expert
    t) starts each round from the same values and adds the same mixed change: they stay
    bitwise equal, as mixing parameters would keep them (docs/method.md)."""
    ck = store.read(str(coded_runs["int8_w1"] / "checkpoints" / "round_002.h5"))
    states = {k: c.state for k, c in ck.clients.items()}  # client k has task k here
    own = sorted(key for key in states[0] if key.startswith("connector.task_adapter."))
    assert own
    for k in range(3):
        for i, t in enumerate(t for t in range(3) if t != k):  # foreign experts in task order
            for key in own:
                foreign = key.replace("connector.task_adapter.", f"connector.foreign.{i}.")
                assert torch.equal(states[k][foreign], states[t][key]), (k, t, key)


def test_an_interrupted_int8_run_resumes_bitwise_with_its_residuals(coded_runs):
    same_run(coded_runs["int8_w1"], coded_runs["int8_resumed"])


def test_int4_up_int8_down_fedadam_gives_the_same_numbers_with_one_or_three_ranks(coded_runs):
    same_run(coded_runs["int4_w1"], coded_runs["int4_w3"])
    # The residual is what the encoding left out, carried to the next round: not all zero
    # (its bound per block is tests/unit/test_codecs.py's).
    ck = store.read(str(coded_runs["int4_w1"] / "checkpoints" / "round_002.h5"))
    assert any(float(r.abs().max()) > 0 for c in ck.clients.values() for r in c.residual.values())


def test_the_update_tags_carry_the_encoded_bytes_about_a_quarter_of_float32(coded_runs):
    """Rank 1 hosts client 1: per round it sends its encoded row ("update") and, for
    ATA's Gram pass, its personal part once more ("gram"), each part encoded on its own."""
    run = coded_runs["int8_w3"]
    entry = load_metrics(run)["rounds"][1]["bytes"]
    traffic = json.loads((run / "traffic" / "rank_001.json").read_text())
    sent = {tag: sum(t["sent"] for t in traffic if t["tag"] == tag) for tag in ("update", "gram")}
    rounds = 2
    assert sent["update"] + sent["gram"] == rounds * entry["up"]
    assert 3.8 < entry["up_float32"] / entry["up"] <= 4 / (1 + 4 / 128) + 1e-9
    assert entry["ratio_up"] == round(entry["up_float32"] / entry["up"], 4)
    # What comes back is encoded too: the shared rows and its own personal row.
    received = sum(t["received"] for t in traffic if t["tag"] in ("shared", "personal"))
    assert received == rounds * entry["down"]
    assert entry["down"] < entry["down_float32"] / 3.8


def test_the_log_names_bytes_per_client_and_the_ratio(coded_runs):
    doc = load_metrics(coded_runs["int4_w3"])
    entry = doc["rounds"][1]["bytes"]
    # int4 up: ~7.5x fewer bytes than float32 (one float32 scale per 128 values); int8 back.
    assert 7.0 < entry["ratio_up"] <= 8 / (1 + 8 / 128) + 1e-4
    assert 3.8 < entry["ratio_down"] <= 4 / (1 + 4 / 128) + 1e-4
    assert "bytes" not in doc["rounds"][0]  # round 0 exchanges nothing
    mib = lambda n: f"{n / 2**20:.3f} MiB"  # noqa: E731
    line = (f"bytes/client up {mib(entry['up'])} ({entry['ratio_up']:.2f}x fewer than float32), "
            f"down {mib(entry['down'])} ({entry['ratio_down']:.2f}x)")
    assert (coded_runs["int4_w3"] / "log.txt").read_text().count(line) == 2  # rounds 1 and 2
