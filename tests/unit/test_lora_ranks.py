"""Heterogeneous LoRA ranks under zero_pad: the config, the truncation, and that local
training keeps a client's components beyond its rank at exactly zero."""

from __future__ import annotations

import pytest
import torch

from pilot_hpc.config import Config, ConfigError, client_lora_ranks, load_config
from pilot_hpc.fl import lora_distance as ld


def test_ranks_from_a_list_or_by_task_and_defaults_unhashed():
    assert client_lora_ranks(Config()) == [8] * 9
    cfg = load_config(None, ["model.lora_r=16", "model.lora_task_ranks={vqa: 4, caption: 16, grounding: 8}"])
    assert client_lora_ranks(cfg) == [4] * 3 + [16] * 3 + [8] * 3
    listed = load_config(None, ["model.lora_r=16", f"model.lora_ranks={[4] * 3 + [16] * 3 + [8] * 3}"])
    assert client_lora_ranks(listed) == client_lora_ranks(cfg)
    assert cfg.hash() != Config().hash()
    at_default = load_config(None, ["model.lora_ranks=[]", "model.lora_task_ranks={}", "fl.lora_rank_rule=zero_pad"])
    assert at_default.hash() == Config().hash() and at_default.result_hash() == Config().result_hash()


def test_the_warm_start_does_not_depend_on_the_clients_ranks():
    from pilot_hpc.train.warm_start import base_key

    cfg = load_config(None, ["model.lora_ranks=[2, 8, 4, 8, 8, 8, 8, 8, 8]"])
    assert base_key(cfg, "d") == base_key(Config(), "d")


@pytest.mark.parametrize("overrides, message", [
    (["fl.lora_rank_rule=stack"], "needs one global LoRA .* own dense residual.* fl.lora_rank_rule=zero_pad"),
    (["fl.lora_rank_rule=stack", "fl.strategy=fedadam"], "fl.strategy=fedadam gives clients"),
    (["fl.lora_rank_rule=stack", "fl.strategy=fedavg", "fl.codec=int8"], "fl.codec=float32"),
    (["fl.lora_rank_rule=stack", "fl.strategy=fedavg", "fl.wire_dtype=bfloat16"], "fl.codec=float32"),
    (["fl.lora_rank_rule=stack", "fl.strategy=fedavg", "fl.codec_down=bfloat16"], "fl.codec_down unset"),
    (["fl.lora_rank_rule=stack", "fl.strategy=fedavg", "privacy.secure_aggregation=true"],
     "privacy.secure_aggregation=false"),
    (["fl.lora_rank_rule=stack", "fl.strategy=fedavg", "privacy.where=client", "privacy.noise_multiplier=1.0"],
     "privacy.where=none"),
    (["fl.lora_rank_rule=stack", "fl.strategy=fedavg", "run.ranks_per_client=2", "train.engine=deepspeed"],
     "run.ranks_per_client=1"),
    (["fl.lora_rank_rule=stack", "fl.strategy=fedavg", "model.dtype=bfloat16"], "model.dtype=float32"),
    (["model.lora_ranks=[2, 8]"], "2 entries but fl.num_clients is 9"),
    (["model.lora_ranks=[2, 4, 4, 4, 4, 4, 4, 4, 4]"], r"model.lora_r \(8\) must be the largest client rank \(4\)"),
    (["model.lora_task_ranks={vqa: 4}"], "give a rank for each task"),
    (["model.lora_ranks=[0, 8, 8, 8, 8, 8, 8, 8, 8]"], "must be >= 1"),
    (["model.lora_ranks=[4, 8, 8, 8, 8, 8, 8, 8, 8]", "model.lora_task_ranks={vqa: 4, caption: 8, grounding: 8}"],
     "both set"),
    (["model.lora_ranks=[4, 8, 8, 8, 8, 8, 8, 8, 8]", "fl.strategy=fedavg"], "wired for fl.strategy=pilot"),
    (["pilot.distance=product", "fl.codec=int8"], "pilot.distance=product compares the clients' LoRA products"),
])
def test_bad_rank_settings_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_stack_is_allowed_for_the_global_strategies(strategy):
    cfg = load_config(None, [f"fl.strategy={strategy}", "fl.lora_rank_rule=stack",
                             "model.lora_ranks=[2, 8, 4, 8, 8, 8, 8, 8, 8]"])
    assert cfg.fl.lora_rank_rule == "stack"
    # the key is hashed: the same run without stack (equal ranks) is another config
    assert (load_config(None, [f"fl.strategy={strategy}", "fl.lora_rank_rule=stack"]).hash() !=
            load_config(None, [f"fl.strategy={strategy}"]).hash())
    by_task = load_config(None, [f"fl.strategy={strategy}", "fl.lora_rank_rule=stack", "model.lora_r=16",
                                 "model.lora_task_ranks={vqa: 4, caption: 16, grounding: 8}"])
    assert client_lora_ranks(by_task)[:4] == [4, 4, 4, 16]
    assert load_config(None, [f"fl.strategy={strategy}", "fl.lora_rank_rule=stack"]).fl.lora_rank_rule == "stack"


def test_truncate_and_own_rank():
    a, b = torch.randn(4, 3), torch.randn(5, 4)
    named = [("x.lora_A.default.weight", a), ("x.lora_B.default.weight", b)]
    ld.truncate_(named, 2)
    assert a[2:].abs().sum() == 0 and b[:, 2:].abs().sum() == 0 and a[:2].abs().min() > 0
    own = ld.own_rank({"x.lora_A.weight": a, "x.lora_B.weight": b}, 2)
    assert own["x.lora_A.weight"].shape == (2, 3) and own["x.lora_B.weight"].shape == (5, 2)
    torch.testing.assert_close(own["x.lora_B.weight"] @ own["x.lora_A.weight"], b @ a, rtol=0, atol=0)


def test_training_keeps_the_components_beyond_the_rank_at_zero():
    """peft LoRA at rank 4 truncated to 2, trained with the torch engine's optimiser (AdamW,
    weight decay) and gradient clipping: the padded components stay exactly zero."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], lora_dropout=0.1))
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    ld.truncate_(named, 2)
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    start = {n: p.detach().clone() for n, p in named}
    for _ in range(20):
        x = torch.randn(16, 6)
        loss = (model(x) - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
    for n, p in named:
        kept, beyond = (p[:2], p[2:]) if ".lora_A." in n else (p[:, :2], p[:, 2:])
        assert beyond.abs().sum() == 0, n  # exactly zero, not small
        assert not torch.equal(kept, start[n][:2] if ".lora_A." in n else start[n][:, :2]), n  # it trained


def test_pilot_truncates_the_hosted_clients_lora_to_its_rank(monkeypatch):
    """PilotClient under zero_pad: install and begin_round zero the components beyond the
    hosted client's rank (client 0: rank 2 of 8), and refuse to run outside hosting."""
    from pilot_hpc.fl import client as fl_client
    from pilot_hpc.fl.strategies.pilot import PilotClient

    # No client hosted: an earlier test whose body raised inside hosting() leaves its
    # client recorded on purpose (the abort handler names it).
    monkeypatch.setattr(fl_client, "_hosted", None)

    class FakeModel:
        def __init__(self):
            self.a, self.b = torch.ones(8, 3), torch.ones(4, 8)

        def lora_named_parameters(self):
            return [("q.lora_A.default.weight", self.a), ("q.lora_B.default.weight", self.b)]

        def pilot_modules(self):
            return []

    cfg = load_config(None, ["model.lora_ranks=[2, 8, 4, 8, 8, 8, 8, 8, 8]"])
    policy, pm = PilotClient(cfg), FakeModel()
    with pytest.raises(RuntimeError, match="inside fl.client.hosting"):
        policy.install(pm, torch.zeros(3, 0), torch.ones(56))
    fl_client._hosted = 0  # what hosting(pm, slot) records for client 0
    try:
        policy.install(pm, torch.zeros(3, 0), torch.ones(56))
    finally:
        fl_client._hosted = None
    assert pm.a[:2].eq(1).all() and pm.a[2:].eq(0).all() and pm.b[:, :2].eq(1).all() and pm.b[:, 2:].eq(0).all()
    assert PilotClient(Config()).ranks is None  # equal ranks: nothing to truncate


def test_stack_merge_equals_the_weighted_sum_of_explicit_products():
    """fl.lora_rank_rule=stack, float64: clients of ranks {2, 8, 4} stored padded to R = 8,
    their rows fed to the server's packer in chunks that split factors; merging the packed
    stacked factors gives base + sum_k w_k s B_k A_k of explicitly formed products. The two
    sides sum the same rank-one terms in another order, so they agree to float64 rounding:
    rtol 1e-12 of entries of order 1 (each entry is a sum of ~14 terms of order 1, whose
    rounding is ~14 * 2^-53 ~ 2e-15 relative)."""
    from pilot_hpc.fl import stack

    torch.manual_seed(0)
    ranks, big_r, scale = [2, 8, 4], 8, 16 / 8
    shapes = [("m0", 6, 5), ("m1", 3, 7)]  # (module, in, out)
    named_by_client, explicit = [], {}
    for k, r in enumerate(ranks):
        named = []
        for m, n_in, out in shapes:
            a, b = torch.zeros(big_r, n_in, dtype=torch.float64), torch.zeros(out, big_r, dtype=torch.float64)
            a[:r], b[:, :r] = torch.randn(r, n_in, dtype=torch.float64), torch.randn(out, r, dtype=torch.float64)
            named += [(f"{m}.lora_A.default.weight", a), (f"{m}.lora_B.default.weight", b)]
        named_by_client.append(named)
    spans = ld.layout(named_by_client[0], scale)
    rows = torch.stack([torch.cat([t.reshape(-1) for _, t in named]) for named in named_by_client])
    n = torch.tensor([30.0, 10.0, 20.0], dtype=torch.float64)
    w = n / n.sum()
    packer = stack.StackedFactors(spans, torch.tensor([0, 1, 2]), w, ranks)
    for col in range(0, rows.shape[1], 17):  # 17 columns a chunk: factors straddle chunks
        packer.feed(rows[:, col:col + 17], col)
    got = packer.result()
    assert got.clients == [0, 1, 2] and got.ranks == ranks
    assert got.packed.numel() == stack.packed_size(spans, ranks) == sum(ranks) * sum(i + o for _, i, o in shapes)
    base = {stack.module_path(s): torch.randn(s.b_shape[0], s.a_shape[1], dtype=torch.float64) for s in spans}
    before = {p: t.clone() for p, t in base.items()}
    stack.merge(base, spans, got)
    for m, n_in, out in shapes:
        want = before[m].clone()
        for k, r in enumerate(ranks):
            named = dict(named_by_client[k])
            a, b = named[f"{m}.lora_A.default.weight"][:r], named[f"{m}.lora_B.default.weight"][:, :r]
            want += float(w[k]) * scale * (b @ a)  # the client's own-rank product, formed explicitly
        torch.testing.assert_close(base[m], want, rtol=1e-12, atol=1e-12)
    # A client with weight 0 (excluded: non-finite) is left out of the stack altogether.
    packer = stack.StackedFactors(spans, torch.tensor([0, 1, 2]), torch.tensor([0.5, 0.0, 0.5]), ranks)
    packer.feed(rows, 0)
    assert packer.result().clients == [0, 2]


def test_stack_client_restarts_b_and_truncates_to_its_rank(monkeypatch):
    """FedAvgClient under stack: begin_round zeroes the hosted client's components beyond its
    rank; install of a participant's answer sets B to zero (A kept), the projector averaged."""
    from pilot_hpc.fl import client as fl_client
    from pilot_hpc.fl.strategies.fedavg import FedAvgClient

    class FakeModel:
        def __init__(self):
            self.a, self.b = torch.ones(8, 3), torch.ones(4, 8)
            self.proj = torch.zeros(2)

        def lora_named_parameters(self):
            return [("q.lora_A.default.weight", self.a), ("q.lora_B.default.weight", self.b)]

    cfg = load_config(None, ["fl.strategy=fedavg", "fl.lora_rank_rule=stack",
                             "model.lora_ranks=[2, 8, 4, 8, 8, 8, 8, 8, 8]"])
    policy, pm = FedAvgClient(cfg), FakeModel()
    monkeypatch.setattr(policy, "shared_params", lambda pm: [pm.proj])
    monkeypatch.setattr(fl_client, "_hosted", 2)
    policy.begin_round(pm, 1, None)
    assert pm.a[:4].eq(1).all() and pm.a[4:].eq(0).all() and pm.b[:, 4:].eq(0).all()
    policy.install(pm, torch.ones(1, 2), torch.zeros(0))
    assert pm.proj.eq(1).all() and pm.b.eq(0).all() and pm.a[:4].eq(1).all()
    pm.b.fill_(3.0)
    policy.install(pm, torch.ones(1, 2), None)  # sat out: nothing to restart
    assert pm.b.eq(3.0).all()


def test_fedprox_under_stack_truncates_its_anchor_too(monkeypatch):
    """The proximal pull mu (w - anchor) would revive the components beyond a client's rank
    if the anchor kept them: begin_round truncates the live LoRA and the anchor alike."""
    from types import SimpleNamespace

    from pilot_hpc.fl import client as fl_client
    from pilot_hpc.fl.strategies.fedprox import FedProxClient

    a, b = torch.nn.Parameter(torch.ones(8, 3)), torch.nn.Parameter(torch.ones(4, 8))
    pm = SimpleNamespace(connector=SimpleNamespace(task_adapter=torch.nn.Linear(2, 2)),
                         lora_named_parameters=lambda: [("q.lora_A.default.weight", a), ("q.lora_B.default.weight", b)])
    start = {"connector.task_adapter.weight": torch.zeros(2, 2), "connector.task_adapter.bias": torch.zeros(2),
             "lora.q.lora_A.default.weight": torch.ones(8, 3), "lora.q.lora_B.default.weight": torch.ones(4, 8)}
    cfg = load_config(None, ["fl.strategy=fedprox", "fl.lora_rank_rule=stack",
                             "model.lora_ranks=[2, 8, 4, 8, 8, 8, 8, 8, 8]"])
    policy = FedProxClient(cfg)
    monkeypatch.setattr(fl_client, "_hosted", 0)
    policy.begin_round(pm, 1, start)
    anchor_a, anchor_b = policy.anchor[2], policy.anchor[3]
    assert a[2:].abs().sum() == 0 and anchor_a[2:].abs().sum() == 0 and anchor_b[:, 2:].abs().sum() == 0
    assert anchor_a[:2].eq(1).all() and start["lora.q.lora_A.default.weight"].eq(1).all()  # the start kept
    loss = policy.extra_loss(pm)["prox"]
    loss.backward()
    assert a.grad[2:].abs().sum() == 0 and b.grad[:, 2:].abs().sum() == 0
