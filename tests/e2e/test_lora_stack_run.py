"""fl.lora_rank_rule=stack (FLoRA) through whole runs: FedAvg with clients of LoRA ranks
[2, 8, 4] under `mpiexec -n 3` (a chunked exchange, a probe that saves what each client
sends). After round 1 the merged base delta is the stacked product of the clients' round-1
LoRA; each client restarts at B = 0 with its own rank; one rank interrupted in round 2 and
resumed gives bitwise the W = 3 run; export writes the client's rank-2 adapter, the merged
base weights and a merged folder that transformers loads. Three short runs in all."""

import json
import os

import pytest
import torch

from helpers import args_for, load_metrics, ok, run_main

RANKS = [2, 8, 4]  # the smoke model's model.lora_r is 8
STACK = ["fl.strategy=fedavg", "fl.lora_rank_rule=stack", f"model.lora_ranks={RANKS}"]


@pytest.fixture(scope="module")
def stack_runs(cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    probe = root / "probe"
    probe.mkdir()
    env = {"SECAGG_PROBE": str(probe),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    # 0.01 MiB chunks (2621 float32 columns): LoRA factors straddle the chunks the server packs.
    probed = ["fl.chunk_mb=0.01", "fl.transforms=[secagg_probe:RowProbe]"]
    ok(run_main(args_for(cache_dir, root / "w3") + STACK + probed, np=3, timeout=600, env=env))
    # W = 1, unchunked, stopped in round 2 (the merged base of round 1 in the checkpoint), resumed.
    resumed = args_for(cache_dir, root / "w1") + STACK + ["fl.chunk_mb=0"]
    stopped = run_main(resumed, timeout=600, env={"PILOT_HPC_INJECT": "sigterm:rank=0,round=2,step=2"})
    assert stopped.returncode == 75, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    again = ok(run_main(resumed, timeout=600))
    assert "interrupted mid-round" in again.stdout
    return root


def model_of(run_dir):
    """The run's model as built before round 1 (base weights W0), its LoRA layout, its config."""
    from pilot_hpc.checkpoint import read
    from pilot_hpc.export import base_model_folder, find_checkpoint, run_config
    from pilot_hpc.fl import lora_distance, stack
    from pilot_hpc.model.build import build_pilot_model

    cfg = run_config(read(find_checkpoint(str(run_dir), 1), clients=[]).attrs, "round 1")
    pm = build_pilot_model(base_model_folder(cfg), cfg.model, len(cfg.tasks), 0, seed=cfg.run.seed,
                           device=torch.device("cpu"), pilot=cfg.pilot)
    spans = lora_distance.model_layout(pm)
    return cfg, spans, {p: w.detach().clone() for p, w in stack.base_weights(pm, spans).items()}


def test_round_one_merges_the_stacked_product_of_the_clients_lora(stack_runs):
    from pilot_hpc.checkpoint import read
    from pilot_hpc.fl import stack

    root = stack_runs
    cfg, spans, w0 = model_of(root / "w3")
    ck = read(str(root / "w3" / "checkpoints" / "round_001.h5"))
    assert ck.attrs["lora_rank_rule"] == "stack" and json.loads(ck.attrs["lora_ranks"]) == RANKS
    sent = [torch.load(root / "probe" / f"r1_c{k}.pt") for k in range(3)]
    n = torch.tensor([s["num_samples"] for s in sent], dtype=torch.float64)
    w = n / n.sum()  # FedAvg's weights: every client took part and was finite
    for s in spans:
        path = stack.module_path(s)
        merged = ck.server[stack.STATE_PREFIX + path].double()
        exact, mass = torch.zeros_like(merged), torch.zeros_like(merged)
        for k, r in enumerate(RANKS):
            row = sent[k]["rows"]["personal"].double()
            a = row[s.a_off:s.a_off + s.a_shape[0] * s.a_shape[1]].view(s.a_shape)
            b = row[s.b_off:s.b_off + s.b_shape[0] * s.b_shape[1]].view(s.b_shape)
            assert a[r:].abs().sum() == 0 and b[:, r:].abs().sum() == 0, (k, path)  # trained at its own rank
            exact += float(w[k]) * s.scale * (b[:, :r] @ a[:r])
            mass += float(w[k]) * s.scale * (b[:, :r].abs() @ a[:r].abs())
        # float32: B scaled by w_k s (half an ulp), the product's sum of 14 rank terms (14 ulp
        # of their absolute mass), then the addition to W0 (half an ulp of the result).
        tol = 16 * 2.0 ** -24 * mass + 2.0 ** -24 * merged.abs()
        delta = merged - w0[path].double()
        assert bool(((delta - exact).abs() <= tol).all()), path
        assert bool((exact.abs() > 100 * tol).any()), path  # a delta far above the tolerance: it did move
    for k, r in enumerate(RANKS):  # every client restarts at B = 0, its A at its own rank
        state = ck.clients[k].state
        for key in [key for key in state if ".lora_A." in key]:
            assert state[key][r:].abs().sum() == 0 and state[key][:r].abs().sum() > 0, (k, key)
            assert state[key.replace(".lora_A.", ".lora_B.")].abs().sum() == 0, (k, key)


def test_the_stacked_factors_travel_once_to_every_rank(stack_runs):
    """Down: the [K] mask of included clients and the packed factors, sum r_k (in + out)
    float32 values per module, one broadcast per round; no personal row is scattered."""
    from pilot_hpc.fl import stack

    root = stack_runs
    _, spans, _ = model_of(root / "w3")
    traffic = json.loads((root / "w3" / "traffic" / "rank_001.json").read_text())
    got = [t["received"] for t in traffic if t["op"] == "bcast" and t["tag"] == "stacked"]
    assert got == [4 * stack.packed_size(spans, RANKS)] * 2
    assert not [t for t in traffic if t["tag"] in ("personal", "personal_global")]


def test_interrupted_and_resumed_on_one_rank_is_bitwise_the_three_rank_run(stack_runs):
    from pilot_hpc.checkpoint import read

    root = stack_runs
    m1, m3 = load_metrics(root / "w1"), load_metrics(root / "w3")
    assert m1["rounds"] == m3["rounds"] and m1["final"] == m3["final"]
    c1, c3 = (read(str(root / w / "checkpoints" / "round_002.h5")) for w in ("w1", "w3"))
    assert sorted(c1.server) == sorted(c3.server) and c3.server
    for key, t in c3.server.items():
        assert torch.equal(t, c1.server[key]), key
    for k, rec in c3.clients.items():
        for key, t in rec.state.items():
            assert torch.equal(t, c1.clients[k].state[key]), (k, key)


def test_export_writes_the_own_rank_adapter_and_the_merged_base(stack_runs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from pilot_hpc.checkpoint import read
    from pilot_hpc.export import STACK_BASE_FILE, export_client, load_client
    from pilot_hpc.fl import stack

    root = stack_runs
    out = tmp_path / "export0"
    info = export_client(str(root / "w3"), 0, str(out))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["lora_alpha"] == 16 * 2 / 8
    for name, t in load_file(str(out / "adapter_model.safetensors")).items():
        assert (t.shape[0] if "lora_A" in name else t.shape[1]) == 2, name
    ck = read(str(root / "w3" / "checkpoints" / "round_002.h5"), clients=[])
    base = load_file(str(out / STACK_BASE_FILE))
    assert len(base) == len(ck.server)
    merged = AutoModelForImageTextToText.from_pretrained(str(out / info["merged"]))
    loaded = load_client(str(out))
    for key, t in ck.server.items():
        name = key.removeprefix(stack.STATE_PREFIX).removeprefix("base_model.model.") + ".weight"
        assert torch.equal(base[name], t), name
        # B = 0 after the merge: merging the adapter adds nothing to the merged base.
        assert torch.equal(merged.get_parameter(name), t), name
        assert torch.equal(loaded.get_parameter(name), t), name
