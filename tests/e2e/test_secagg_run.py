"""Secure aggregation in a whole run (privacy.secure_aggregation=true, FedAvg, mpiexec -n 3,
a chunked exchange, client 1's update non-finite in round 1): what every client installs
is the weighted mean of the good clients' updates within the fixed-point bound, the masked
rows travel as 8-byte words, and Pilot is refused before anything loads."""

import json
import os

import pytest
import torch

from helpers import CHUNK_MB, args_for, load_metrics, run_main


@pytest.fixture(scope="module")
def secure_run(cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg")
    probe = root / "probe"
    probe.mkdir()
    env = {"SECAGG_PROBE": str(probe), "PILOT_HPC_INJECT": "nan_update:client=1,round=1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    proc = run_main(args_for(cache_dir, root / "run") + [
        "fl.strategy=fedavg", "privacy.secure_aggregation=true", f"fl.chunk_mb={CHUNK_MB}",
        "fl.transforms=[secagg_probe:RowProbe]"], np=3, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc


def test_the_installed_model_is_the_weighted_mean_of_the_good_updates(secure_run):
    from pilot_hpc.config import load_config
    from pilot_hpc.fl.secagg import quantisation_bound
    from pilot_hpc.fl.strategies import get_strategy

    root, proc = secure_run
    seen = {(r, c): torch.load(root / "probe" / f"r{r}_c{c}.pt") for r in (1, 2) for c in range(3)}
    assert [seen[1, c]["status"] for c in range(3)] == ["participated", "excluded_nonfinite", "participated"]
    assert "client(s) [1] excluded from aggregation" in proc.stdout + proc.stderr
    n = torch.tensor([seen[1, c]["num_samples"] for c in range(3)])
    good = torch.tensor([True, False, True])
    cfg = load_config(None, ["fl.strategy=fedavg", "fl.num_clients=3", "fl.client_tasks=[vqa, caption, grounding]",
                             "pilot.top_m=1"])
    aggregator = get_strategy("fedavg", cfg).aggregator
    w = aggregator.plan(n, good, None).shared[0]  # n_k / (n_0 + n_2) for clients 0 and 2, 0 for client 1
    for part in ("shared_by_task", "personal"):
        x = torch.stack([seen[1, c]["rows"][part] for c in range(3)]).double()  # [3, P]
        installed = seen[2, 0]["start"][part]  # what client 0 started round 2 from
        assert torch.equal(seen[2, 2]["start"][part], installed)  # one global model
        assert torch.equal(seen[2, 1]["start"][part], seen[1, 1]["start"][part])  # excluded: kept its own
        terms = w[:, None] * x
        exact, mass = terms.sum(0), terms.abs().sum(0)
        # 2 good senders: 2 * 2^-41 of rounding to the grid, float64 products and sums (a few
        # ulp of the mass at 2^-52), then float32's half ulp (2^-24 relative) of the result.
        tol = quantisation_bound(2) + 4 * 2.0 ** -52 * mass + 2.0 ** -24 * exact.abs()
        assert bool(((installed.double() - exact).abs() <= tol).all()), part
        assert not torch.equal(installed, seen[1, 0]["start"][part])  # and it did move
        # plain FedAvg's one-shot aggregation of the same updates (float32: (K + 2) ulp of the mass)
        x[1] = float("nan")
        plain = aggregator.aggregate(x[:, :0].float(), x.float(), n).personal[0].double()
        assert bool(((installed.double() - plain).abs() <= tol + 5 * 2.0 ** -24 * mass).all()), part
    rounds = load_metrics(root / "run")["rounds"]
    assert [r["participation"] for r in rounds[1]["clients"]] == ["participated", "excluded_nonfinite", "participated"]


def test_the_masked_rows_travel_as_eight_byte_words(secure_run):
    """Each client rank sends its client's whole row, [shared | personal] as int64 words,
    once per round (client 1's zeros in round 1 included: the row counts follow the
    selection), and the secure sum's control traffic besides."""
    root, _ = secure_run
    width = sum(t.numel() for t in torch.load(root / "probe" / "r1_c0.pt")["rows"].values())
    for rank in (1, 2):
        traffic = json.loads((root / "run" / "traffic" / f"rank_{rank:03d}.json").read_text())
        sent = sum(t["sent"] for t in traffic if t["op"] == "gatherv" and t["tag"] == "update")
        assert sent == 2 * width * 8, (rank, sent, width)
        assert {t["tag"] for t in traffic} >= {"secagg_keys", "secagg_records", "secagg_result"}


def test_pilot_with_secure_aggregation_is_refused_before_training(tmp_path, cache_dir):
    proc = run_main(args_for(cache_dir, tmp_path / "x") + ["privacy.secure_aggregation=true"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "privacy.secure_aggregation=true cannot go with fl.strategy=pilot" in proc.stderr
    assert "distances between their individual updates" in proc.stderr
    assert not (tmp_path / "x" / "metrics.json").exists()
