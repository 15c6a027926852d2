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
    (["fl.lora_rank_rule=stack"], "implemented as a function .* not yet wired"),
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
