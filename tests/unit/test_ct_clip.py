"""CT-CLIP: CLIP's MLPs with the connector's treatment (trainable sets per stage, the
stage-0 model unchanged, the mixture with CLIP's activation, what is sent and installed)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from pilot_hpc.config import PilotConfig, load_config
from pilot_hpc.data.records import InstructionDataset, collate_train, load_records
from pilot_hpc.data.synthetic import client_files
from pilot_hpc.fl.flat import flatten
from pilot_hpc.fl.strategies import get_strategy
from pilot_hpc.model.connector import PilotConnector
from pilot_hpc.model.ct_clip import attach_ct_clip, ct_clip_counts
from pilot_hpc.model.ctmoa import mlp_expert_index
from pilot_hpc.model.llava import build_pilot_model


@pytest.fixture(scope="module")
def models(small_world):
    cfg, folder, base = small_world
    plain = build_pilot_model(base, cfg.model, 3, 1, seed=0, device=torch.device("cpu"))
    ct = build_pilot_model(base, cfg.model, 3, 1, seed=0, device=torch.device("cpu"), pilot=PilotConfig(ct_clip=True))
    train, _ = client_files(folder, cfg.fl.num_clients)
    ds = InstructionDataset(load_records(train[1]), ct.tokenizer, ct.image_processor, ct.num_image_tokens,
                            cfg.data.max_length)
    batch = collate_train([ds[i] for i in range(4)], ct.tokenizer.pad_token_id)
    return cfg, plain, ct, batch


def parts(names):
    """Trainable parameter names -> {connector.<part>, clip.<part>, lora, other}."""
    out = set()
    for n in names:
        m = re.search(r"encoder\.layers\.\d+\.mlp\.(\w+)", n)
        if "lora_" in n:
            out.add("lora")
        elif m:
            out.add(f"clip.{m.group(1)}")
        elif "multi_modal_projector." in n:
            out.add("connector." + n.split("multi_modal_projector.")[1].split(".")[0])
        else:
            out.add("other")
    return out


def test_every_clip_mlp_becomes_a_connector(models):
    cfg, _, ct, _ = models
    assert len(ct.clip_mlps) == cfg.model.vision_layers
    assert all(isinstance(m, PilotConnector) and m.activation == "quick_gelu" for m in ct.clip_mlps)


def test_trainable_parts_per_stage(models):
    _, _, ct, _ = models
    ct.set_stage(0)
    assert ct.trainable_names() == []
    ct.set_stage(1)
    assert parts(ct.trainable_names()) == {"lora", "connector.task_adapter", "connector.client_adapter",
                                           "clip.task_adapter", "clip.client_adapter"}
    ct.set_stage(2)
    assert parts(ct.trainable_names()) == {"lora", "connector.task_adapter", "connector.cross", "connector.router",
                                           "clip.task_adapter", "clip.cross", "clip.router"}
    # CLIP's attention, norms and embeddings never train.
    assert not [n for n in ct.trainable_names() if "vision_tower" in n and ".mlp." not in n]


def test_stage0_is_the_base_model(models):
    _, plain, ct, batch = models
    plain.set_stage(0)
    ct.set_stage(0)
    with torch.no_grad():
        assert torch.equal(plain.model(**batch).logits, ct.model(**batch).logits)


def test_gradients_reach_clip_adapters_in_both_stages(models):
    _, _, ct, batch = models
    with torch.enable_grad():
        for stage, names in ((1, ("task_adapter", "client_adapter")), (2, ("task_adapter", "cross", "router"))):
            ct.set_stage(stage)
            if stage == 2:
                for m in ct.pilot_modules():
                    m.init_cross_adapters()
            ct.model.zero_grad(set_to_none=True)
            out = ct.model(**batch)
            (out.loss + sum(ct.aux().values())).backward()
            # The first CLIP layer (the last one's output is not among LLaVA's features).
            first = ct.clip_mlps[0]
            for name in names:
                grads = [p.grad for p in getattr(first, name).parameters()]
                assert all(g is not None and torch.isfinite(g).all() for g in grads), (stage, name)
                assert any(bool(g.abs().sum() > 0) for g in grads), (stage, name)
            assert set(ct.aux()) == ({"diff"} if stage == 1 else {"balance", "z"})


def test_module_mixture_equals_the_reference_for_gelu_mlps():
    torch.manual_seed(0)

    class Projector(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_1, self.act, self.linear_2 = nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 10)

        def forward(self, x):
            return self.linear_2(self.act(self.linear_1(x)))

    conn = PilotConnector(Projector(), 3, 1, seed=4)
    conn.set_stage(2)
    conn.init_cross_adapters()
    with torch.no_grad():
        for p in conn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h = torch.randn(2, 5, 6)
    ref = conn(h)  # activation "gelu": the CT-MoA reference
    mixed, stats = conn.module_mixture(h, mlp_expert_index(3))
    # fp32, the same products summed in the same order: only GELU's two code paths differ.
    torch.testing.assert_close(mixed, ref, rtol=1e-6, atol=1e-6)
    assert stats.num_tokens == 10


def test_pilot_sends_and_installs_every_task_adapter(models):
    cfg, _, ct, _ = models
    strategy = get_strategy("pilot", load_config(None, ["pilot.ct_clip=true"])).policy
    sent = strategy.shared_params(ct)
    modules = ct.pilot_modules()
    assert sum(p.numel() for p in sent) == sum(p.numel() for m in modules for p in m.task_adapter.parameters())
    n = sum(p.numel() for p in sent)
    shared = torch.stack([torch.full((n,), float(t + 1)) for t in range(3)])  # task t's row holds t + 1
    before_lora = flatten(strategy.personal_params(ct))
    strategy.install(ct, shared, before_lora.clone())
    for m in modules:
        assert bool((flatten(list(m.task_adapter.parameters())) == m.own_task + 1).all())
        for t, f in zip(m.foreign_tasks(), m.foreign):
            assert bool((flatten(list(f.parameters())) == t + 1).all())


def test_counts_at_clip_l():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                 num_attention_heads=16, image_size=336, patch_size=14))
    c = ct_clip_counts(tower, 3)
    assert c["communicated"] == 24 * (1024 * 4096 + 4096 + 4096 * 1024 + 1024)  # ~0.2B, as the paper's +0.2B
    assert c["activated"] == 5 * c["communicated"] + 24 * 3 * 1024
    with torch.device("meta"):
        attach_ct_clip(tower, 3, 0, pilot=PilotConfig(ct_clip=True), ctmoa_impl="reference", seed=0)
    assert ct_clip_counts(tower, 3) == c  # the same counts once attached


def test_ct_clip_needs_pilot():
    with pytest.raises(Exception, match="pilot.ct_clip"):
        load_config(None, ["pilot.ct_clip=true", "fl.strategy=fedavg"])
