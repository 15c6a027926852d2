"""Client-level DP in whole runs (pilot_hpc.fl.privacy): one FedAvg run with server-side
noise and adaptive clipping under mpiexec -n 3 (sampled participation, a chunked
exchange), the same configuration on one rank, preempted mid-round and resumed, which must
end bitwise equal to it; and Pilot with client-side noise on one rank, stopped by its
epsilon budget."""

import json
import math
import os

import pytest

from helpers import SMOKE, args_for, load_metrics, run_main, small_overrides
from pilot_hpc.config import load_config
from pilot_hpc.fl import participation, privacy

CLIP = 0.05  # C_0: adaptive clipping moves it every round
# sigma_b 1 (the default, 2 participants / 20, is refused with z = 1): z_delta = (1 - 1/4)^-1/2.
SERVER_DP = ["fl.strategy=fedavg", "fl.clients_per_round=2", "privacy.where=server", "privacy.noise_multiplier=1.0",
             f"privacy.clip_norm={CLIP}", "privacy.adaptive_clip=true", "privacy.clip_count_stddev=1.0",
             "fl.transforms=[transform_probe:ChangeProbe]"]


def probe_env(path):
    return {"TRANSFORM_PROBE": str(path),
            "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def server_dp(small_world, cache_dir, tmp_path_factory):
    """W = 3 uninterrupted (chunks of 16384 columns), then W = 1 (whole parts) preempted in
    round 2 and resumed."""
    out = tmp_path_factory.mktemp("server_dp")
    three = run_main(args_for(cache_dir, out / "w3") + SERVER_DP + ["fl.chunk_mb=0.0625"], np=3, timeout=600,
                     env=probe_env(out / "w3.jsonl"))
    assert three.returncode == 0, three.stdout[-3000:] + three.stderr[-3000:]
    args = args_for(cache_dir, out / "w1") + SERVER_DP + ["fl.chunk_mb=0"]
    stopped = run_main(args, timeout=600, env={**probe_env(out / "w1.jsonl"),
                                               "PILOT_HPC_INJECT": "sigterm:rank=0,round=2,step=2"})
    assert stopped.returncode == 75, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    again = run_main(args, timeout=600, env=probe_env(out / "w1.jsonl"))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "interrupted mid-round" in again.stdout
    return out, three


def test_every_change_that_left_a_client_is_within_the_clip(server_dp, cache_dir):
    """ChangeProbe runs after the privacy transform: the change as sent, in float64, is at
    most the round's C (metrics.json) plus the float32 rounding of start + change (2^-24 of
    the sent row's norm); the metrics row holds the participant's change before the clip."""
    out, _ = server_dp
    cfg = load_config(SMOKE, small_overrides(cache_dir, str(out)) + ["fl.clients_per_round=2"])
    doc = load_metrics(out / "w3")
    rows = [json.loads(x) for x in (out / "w3.jsonl").read_text().splitlines()]
    expected = {(r, k) for r in (1, 2) for k in participation.selected(cfg, r).nonzero().flatten().tolist()}
    assert {(x["round"], x["client"]) for x in rows} == expected
    assert {(e["round"], c["client"]) for e in doc["rounds"] for c in e["clients"] if "change_norm" in c} == expected
    active = 0
    for x in rows:
        clip = doc["rounds"][x["round"]]["privacy"]["clip_norm"]
        before = doc["rounds"][x["round"]]["clients"][x["client"]]["change_norm"]
        assert x["status"] == "participated" and x["change"] <= clip + 2.0 ** -24 * x["sent"], x
        assert abs(x["change"] - min(before, clip)) <= 2.0 ** -24 * x["sent"] + 2e-6 * clip, (x, before, clip)
        active += x["change"] > 0.99 * clip
    assert active > 0  # the clip was active


def test_the_clip_adapts_by_the_geometric_rule_on_the_noisy_count(server_dp, cache_dir):
    """C_{t+1} = C_t exp(-0.2 (b - 0.5)), b = (the participants within C_t + sigma_b N(0, 1)) / 2,
    the normal drawn from (run.seed, round); the next round clips to it."""
    out, three = server_dp
    seed = load_config(SMOKE, small_overrides(cache_dir, str(out))).run.seed
    doc = load_metrics(out / "w3")
    entries = [e["privacy"] for e in doc["rounds"]]
    assert entries[0]["clip_norm"] == entries[0]["clip_norm_next"] == entries[1]["clip_norm"] == CLIP
    for entry, following in zip(doc["rounds"][1:], entries[2:] + [None]):
        p = entry["privacy"]
        norms = [c["change_norm"] for c in entry["clients"] if c.get("participation") == "participated"]
        count = sum(n <= p["clip_norm"] for n in norms) + 1.0 * privacy.count_noise(seed, entry["round"])
        assert len(norms) == p["clip_participants"] == 2 and p["clip_count"] == count
        assert p["clip_norm_next"] == p["clip_norm"] * math.exp(-0.2 * (count / 2 - 0.5)) != p["clip_norm"]
        assert p["update_noise_multiplier"] == 0.75 ** -0.5 and p["clip_count_stddev"] == 1.0
        if following is not None:
            assert following["clip_norm"] == p["clip_norm_next"]
        line = [ln for ln in (three.stdout + three.stderr).splitlines() if f"round {entry['round']}/2" in ln][0]
        assert f"clip norm {p['clip_norm']:.6g} -> {p['clip_norm_next']:.6g} (adaptive)" in line
    from pilot_hpc.tensorboard import read_scalars

    board = read_scalars(str(out / "w3" / "tensorboard"))
    assert [v for _, v in board["privacy/clip_norm"]] == pytest.approx([p["clip_norm"] for p in entries[1:]],
                                                                       rel=1e-6)


def test_epsilon_in_the_outputs_is_the_accountants_own(server_dp):
    import dp_accounting
    from dp_accounting import rdp

    out, three = server_dp
    doc = load_metrics(out / "w3")
    text = three.stdout + three.stderr
    for entry in doc["rounds"][1:]:
        acc = rdp.RdpAccountant()
        for _ in range(entry["round"]):
            acc.compose(dp_accounting.PoissonSampledDpEvent(2 / 3, dp_accounting.GaussianDpEvent(1.0)))
        eps = acc.get_epsilon(1e-5)
        assert entry["privacy"]["epsilon"] == pytest.approx(eps, rel=1e-9)
        line = [ln for ln in text.splitlines() if f"round {entry['round']}/2" in ln][0]
        assert f"privacy (server): epsilon {eps:.4g} at delta 1e-05" in line and privacy.OUTSIDE in line
    assert doc["rounds"][0]["privacy"]["epsilon"] == 0.0
    results = (out / "w3" / "results.md").read_text()
    assert f"epsilon {doc['rounds'][-1]['privacy']['epsilon']:.4g} at delta 1e-05 after round 2" in results
    assert "outside this guarantee" in results
    from pilot_hpc.tensorboard import read_scalars

    board = read_scalars(str(out / "w3" / "tensorboard"))
    assert [v for _, v in board["privacy/epsilon"]] == pytest.approx(
        [e["privacy"]["epsilon"] for e in doc["rounds"][1:]], rel=1e-6)


def test_one_rank_and_a_resume_give_the_three_rank_run_bitwise(server_dp):
    out, _ = server_dp
    w1, w3 = load_metrics(out / "w1"), load_metrics(out / "w3")
    assert w1["rounds"] == w3["rounds"] and w1["final"] == w3["final"]


def test_pilot_with_client_noise_stops_at_its_budget(small_world, cache_dir, tmp_path):
    """target_epsilon 8 over 2 rounds; a budget between round 1's and round 2's epsilon
    stops the run after round 1, with its outputs."""
    extra = ["fl.strategy=pilot", "privacy.where=client", "privacy.target_epsilon=8", "privacy.clip_norm=0.05"]
    cfg = load_config(SMOKE, small_overrides(cache_dir, str(tmp_path)) + extra)
    one, two = privacy.epsilon_after(cfg, 1), privacy.epsilon_after(cfg, 2)
    assert one < two <= 8.0
    budget = (one + two) / 2
    proc = run_main(args_for(cache_dir, tmp_path / "run") + extra + [f"privacy.epsilon_budget={budget}"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "so the run stops after round 1 of 2" in proc.stdout + proc.stderr
    doc = load_metrics(tmp_path / "run")
    assert [e["round"] for e in doc["rounds"]] == [0, 1]
    assert doc["rounds"][1]["privacy"]["epsilon"] == pytest.approx(one, rel=1e-9) and one <= budget


def test_server_noise_with_pilot_is_refused_before_training(tmp_path, cache_dir):
    proc = run_main(args_for(cache_dir, tmp_path / "x") + ["fl.strategy=pilot", "privacy.where=server"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "privacy.where=server adds noise to the sum" in proc.stderr and "use privacy.where=client" in proc.stderr
