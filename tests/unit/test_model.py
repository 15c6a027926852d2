"""The Pilot connector inside the real transformers LLaVA: trainable sets, stages, state swap."""

import pytest
import torch

from pilot_hpc.model.llava import build_pilot_model


@pytest.fixture(scope="module")
def pm(small_world):
    cfg, _, base = small_world
    return build_pilot_model(base, cfg.model, 3, 1, seed=0, device=torch.device("cpu"))


def groups(names):
    """Parameter names -> the set of parts they belong to."""
    out = set()
    for n in names:
        if "lora_" in n:
            out.add("lora")
        elif "multi_modal_projector" in n:
            part = n.split("multi_modal_projector.")[1].split(".")[0]
            out.add(f"connector.{part}")
        else:
            out.add("other")
    return out


def test_stage0_trains_nothing(pm):
    pm.set_stage(0)
    assert pm.trainable_names() == []


def test_stage1_trainable_set(pm):
    pm.set_stage(1)
    assert groups(pm.trainable_names()) == {"lora", "connector.task_adapter", "connector.client_adapter"}
    # LoRA sits on the language model only (CLIP has q/k/v_proj too).
    lora = [n for n in pm.trainable_names() if "lora_" in n]
    assert lora and all("language_model" in n for n in lora)
    assert all("vision_tower" not in n for n in pm.trainable_names())


def test_stage2_trainable_set(pm):
    pm.set_stage(2)
    assert groups(pm.trainable_names()) == {"lora", "connector.task_adapter", "connector.cross", "connector.router"}
    frozen = [n for n, p in pm.model.named_parameters() if not p.requires_grad]
    assert any("multi_modal_projector.foreign" in n for n in frozen)
    assert any("multi_modal_projector.client_adapter" in n for n in frozen)
    assert all(not p.requires_grad for p in pm.connector.foreign.parameters())


def test_adapters_start_from_the_base_projector(pm, small_world):
    from transformers import LlavaForConditionalGeneration

    _, _, base = small_world
    proj = LlavaForConditionalGeneration.from_pretrained(base).model.multi_modal_projector.state_dict()
    for module in [pm.connector.task_adapter, pm.connector.client_adapter, *pm.connector.foreign]:
        for k, v in module.state_dict().items():
            torch.testing.assert_close(v, proj[k], rtol=0, atol=0)


def test_stage2_gradients_reach_exactly_the_trainable_parts(pm, small_world):
    """One backward pass through the real model: grads on trainable parts, none on frozen ones."""
    from pilot_hpc.data.records import InstructionDataset, collate_train, load_records
    from pilot_hpc.data.synthetic import client_files

    cfg, folder, _ = small_world
    ds = InstructionDataset(load_records(client_files(folder, 3)[0][0]), pm.tokenizer, pm.image_processor,
                            pm.num_image_tokens, cfg.data.max_length)
    pm.connector.init_cross_adapters()
    pm.set_stage(2)
    pm.model.zero_grad(set_to_none=True)
    out = pm.model(**collate_train([ds[0], ds[1]], pm.tokenizer.pad_token_id))
    loss = out.loss + pm.connector.aux["balance"] + pm.connector.aux["z"]
    loss.backward()
    for name, p in pm.model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert pm.connector.router.weight.grad.abs().sum() > 0


def test_state_swap_round_trips(pm):
    before = pm.get_state()
    with torch.no_grad():
        pm.connector.router.weight.add_(1.0)
        pm.lora_named_parameters()[0][1].add_(1.0)
    pm.set_state(before)
    after = pm.get_state()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(before[k], after[k], rtol=0, atol=0)
