"""FedDPA: what is sent (the global LoRA only), the fixed-weight mix of the global and
local LoRA (by hand on one layer), gradients to both, and a run whose checkpoint keeps
one global LoRA for everyone and a personal local LoRA per client."""

from dataclasses import replace

import pytest
import torch

from pilot_hpc.fl.strategies import get_strategy
from pilot_hpc.fl.strategies.feddpa import GLOBAL, LOCAL
from pilot_hpc.model.connector import PLAIN
from pilot_hpc.model.llava import build_pilot_model


def dpa_model(small_world, a: float | None = 0.5):
    """(strategy, model) on the small world's base; a=None: no prepare_model (FedAvg's model)."""
    c, _, base = small_world
    cfg = replace(c, fl=replace(c.fl, strategy="feddpa"), feddpa=replace(c.feddpa, local_weight=0.5 if a is None else a))
    pm = build_pilot_model(base, cfg.model, 3, 0, seed=0, device=torch.device("cpu"))
    s = get_strategy("feddpa", cfg)
    if a is not None:
        s.policy.prepare_model(pm)
    return s, pm, cfg


def first_lora_layer(pm):
    from peft.tuners.lora import LoraLayer

    return next((n, m) for n, m in pm.model.named_modules() if isinstance(m, LoraLayer))


def set_lora(layer, adapter: str, seed: int) -> None:
    """Known, non-zero A and B for one adapter of one layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mats in (layer.lora_A, layer.lora_B):
            w = mats[adapter].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.5)


def text_batch(pm, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, pm.tokenizer.vocab_size, (2, 11), generator=gen)  # odd length on purpose
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_only_the_global_lora_is_sent_and_averaged(small_world):
    s, pm, _ = dpa_model(small_world, a=None)
    plain_keys = set(pm.get_state())
    s.policy.prepare_model(pm)
    names = {id(p): n for n, p in pm.model.named_parameters()}
    sent = [names[id(p)] for p in s.policy.shared_params(pm) + s.policy.personal_params(pm)]
    text = [names[id(p)] for p in s.policy.personal_params(pm)]
    local = [n for n, _ in pm.lora_named_parameters(LOCAL)]
    n_layers = sum(1 for n, _ in pm.model.named_modules() if n.endswith(".lora_A"))
    # Exactly the global adapter's A and B of every LoRA layer, in model order.
    assert len(text) == 2 * n_layers and n_layers > 0
    assert all(f".lora_A.{GLOBAL}." in n or f".lora_B.{GLOBAL}." in n for n in text)
    assert text == [n for n, _ in pm.lora_named_parameters(GLOBAL)]
    # The local adapter mirrors it, is personal state, and is never sent.
    assert sorted(n.replace(f".{LOCAL}.", f".{GLOBAL}.") for n in local) == sorted(text)
    state = pm.get_state()
    assert {f"lora.{n}" for n in local} <= set(state) and not set(local) & set(sent)
    assert set(state) - plain_keys == {f"lora.{n}" for n in local}  # nothing else was added
    # The projector goes like FedAvg's.
    assert [id(p) for p in s.policy.shared_params(pm)] == [id(p) for p in pm.connector.task_adapter.parameters()]

    # Server: FedAvg's sample-weighted mean; n = 2, 1, 1 -> weights 1/2, 1/4, 1/4.
    visual = torch.tensor([[0.0, 2.0], [4.0, 6.0], [2.0, 2.0]])
    txt = torch.tensor([[1.0, 0.0], [3.0, 4.0], [6.0, -2.0]])
    res = s.aggregator.aggregate(visual, txt, torch.tensor([2, 1, 1]))
    torch.testing.assert_close(res.shared, torch.tensor([[1.5, 3.0]]))  # (0+4+2)/4, (4+6+2)/4
    torch.testing.assert_close(res.personal, torch.tensor([[2.75, 0.5]] * 3))  # (2+3+6)/4, (0+4-2)/4
    assert res.excluded == []

    # Installing the server's answer writes the global adapter and leaves the local one.
    before = {n: p.detach().clone() for n, p in pm.lora_named_parameters(LOCAL)}
    width = sum(p.numel() for p in s.policy.personal_params(pm))
    shared = torch.cat([p.detach().reshape(-1) for p in s.policy.shared_params(pm)])[None, :]
    new_text = torch.arange(width, dtype=torch.float32) / width
    s.policy.install(pm, shared, new_text)
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in s.policy.personal_params(pm)]), new_text,
                               rtol=0, atol=0)
    for n, p in pm.lora_named_parameters(LOCAL):
        assert torch.equal(p, before[n]), n


def test_other_strategies_get_one_adapter(small_world):
    _, pm, _ = dpa_model(small_world, a=None)
    assert pm.lora_named_parameters(LOCAL) == []
    assert [n for n, _ in pm.lora_named_parameters(GLOBAL)] == [n for n, _ in pm.lora_named_parameters()]


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
def test_mix_on_one_layer_by_hand(small_world, a):
    _, pm, cfg = dpa_model(small_world, a=a)
    _, layer = first_lora_layer(pm)
    layer.eval()  # no LoRA dropout
    set_lora(layer, GLOBAL, 1)
    set_lora(layer, LOCAL, 2)
    s = cfg.model.lora_alpha / cfg.model.lora_r
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(3))  # [B, L, C]
    with torch.no_grad():
        out = layer(x)
        w0x = layer.base_layer(x)
        g = x @ layer.lora_A[GLOBAL].weight.T @ layer.lora_B[GLOBAL].weight.T * s
        loc = x @ layer.lora_A[LOCAL].weight.T @ layer.lora_B[LOCAL].weight.T * s
    # fp32 tolerance 1e-5 (relative and absolute): the outputs reach |80| here (A, B ~ N(0, 0.25),
    # s = 2), the sums run over 128 (hidden) and 8 (rank) terms, so a different summation order
    # costs ~sqrt(128) * 6e-8 ~ 1e-6 relative (measured: 0.0, peft does the same matmuls); a wrong
    # mix weight is off by >= 0.1 * |g - loc| > 1e-2, far outside.
    torch.testing.assert_close(out, w0x + (1 - a) * g + a * loc, rtol=1e-5, atol=1e-5)
    assert (g - loc).abs().max() > 0.1  # the two adapters really differ here


def test_mix_extremes_on_the_whole_model(small_world):
    # a = 0: the same logits as FedAvg's model (no local adapter at all) with the same global LoRA.
    _, plain, _ = dpa_model(small_world, a=None)
    batch = text_batch(plain)
    _, zero, _ = dpa_model(small_world, a=0.0)
    _, layer_p = first_lora_layer(plain)
    _, layer_z = first_lora_layer(zero)
    set_lora(layer_p, GLOBAL, 1)
    set_lora(layer_z, GLOBAL, 1)
    set_lora(layer_z, LOCAL, 2)  # would change the output if it had any weight
    for m in (plain.model, zero.model):
        m.eval()
    with torch.no_grad():
        ref = plain.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = zero.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # The local term is multiplied by exactly 0.0 and added: bit-identical.
    assert torch.equal(ref, got)
    # a = 1: the global LoRA has no effect, whatever its value...
    before, after = global_lora_change(small_world, batch, a=1.0)
    assert torch.equal(before, after)
    # ...while in the 0.5 mix both count (so the two checks above can fail).
    before, after = global_lora_change(small_world, batch, a=0.5)
    assert (before - after).abs().max() > 1e-3


def global_lora_change(small_world, batch, a: float):
    """Logits before and after setting the global LoRA of the first layer (local set to 2)."""
    _, pm, _ = dpa_model(small_world, a=a)
    pm.model.eval()
    _, layer = first_lora_layer(pm)
    set_lora(layer, LOCAL, 2)
    with torch.no_grad():
        before = pm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        set_lora(layer, GLOBAL, 1)
        after = pm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return before, after

def test_both_adapters_train_in_the_plain_stage(small_world):
    _, pm, _ = dpa_model(small_world, a=0.5)
    lora = dict(pm.lora_named_parameters())
    assert not any(p.requires_grad for p in lora.values())  # stage 0 after prepare_model
    pm.set_stage(PLAIN)
    trainable = set(pm.trainable_names())
    assert set(lora) <= trainable  # both adapters go to the optimiser (federation takes requires_grad)
    loss = pm.model(**text_batch(pm)).loss
    loss.backward()
    for adapter in (GLOBAL, LOCAL):
        params = pm.lora_named_parameters(adapter)
        assert all(p.grad is not None for _, p in params), adapter
        # B starts at zero (so A's gradient is zero in the first step); B's is not.
        b_grad = sum(p.grad.abs().sum() for n, p in params if ".lora_B." in n)
        assert b_grad > 0, adapter


