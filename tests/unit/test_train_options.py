"""The real-scale training options on the tiny model: gradient accumulation, activation
checkpointing, float32 master weights in a bf16 model, the attention key, the cosine
schedule with exact mid-round resume, DataLoader workers, the image pad.

Tolerances (float32, CPU, one thread). Parameters are compared through the relative
error of the round's update, ||p_a - p_b|| / ||p_b - p_start|| (as in test_engine.py).
Accumulation changes only the order of the float sums of the gradient; see TOL_ACCUM
for the measured numbers. Everything that should be the same computation (workers,
resume, checkpointing's recompute) is compared bitwise.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from helpers import build_client, trainable
from helpers import update_error as rel
from pilot_hpc.train import torch_engine
from pilot_hpc.train.engines import train_steps
from pilot_hpc.train.schedule import lr_factor, warmup_steps
from pilot_hpc.train.spec import Hooks, TrainSpec, micro_batches

SEED = 3
# Measured here (stage 1, batch 8, 3 steps, lr 5e-4, dropout 0, clipping at 1.0):
# accumulation 2 and 4 vs 1 differ by 8.5e-7 and 8.4e-7 (float32 sum order); weighting
# each micro-batch's ce by its share of the samples instead of the answer tokens (the
# usual bug) gives 0.065 (test_accumulation_weighting_matters). 1e-5 sits 12x above the
# first and 6500x below the second.
TOL_ACCUM = 1e-5


def build(small_world, *, dropout: float = 0.0, dtype: str = "float32", client: int = 0, **model):
    return build_client(small_world, client=client, lora_dropout=dropout, dtype=dtype, **model)


def run(pm, ds, start=None, *, steps: int = 3, batch_size: int = 8, epochs: int = 100, lr: float = 5e-4,
        should_stop=None, resume=None, engine: str = "torch", **spec):
    """A local round (from `start` when given, else from the model as it is):
    (TrainResult, the per-step terms as floats)."""
    if start is not None:
        pm.set_state(start)
    pm.set_stage(1)
    params = [p for p in pm.model.parameters() if p.requires_grad]
    seen: list[dict[str, float]] = []
    hooks = Hooks(aux_loss=lambda: {"diff": 0.1 * pm.connector.aux["diff"]}, should_stop=should_stop,
                  progress=lambda s, terms: seen.append({k: float(v.detach()) for k, v in terms.items()}))
    s = TrainSpec(lr=lr, batch_size=batch_size, epochs=epochs, max_steps=steps, seed=SEED, engine=engine, **spec)
    res = train_steps(pm.model, ds, params, s, pad_id=pm.tokenizer.pad_token_id, hooks=hooks, resume=resume)
    return res, seen


@pytest.fixture(scope="module")
def client(small_world):
    torch.set_num_threads(1)
    pm, ds, start = build(small_world)
    return pm, ds, start, trainable(pm)


# ---------------------------------------------------------------------------- accumulation


def test_micro_batches_split_full_and_short_batches():
    assert micro_batches(list(range(8)), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert micro_batches([0, 1, 2], 2) == [[0], [1, 2]]  # a short last batch: sizes differ by <= 1
    assert micro_batches([5], 4) == [[5]]  # fewer samples than micro-batches: none empty
    with pytest.raises(ValueError, match="multiple of train.grad_accum_steps"):
        TrainSpec(lr=1e-3, batch_size=8, epochs=1, seed=0, grad_accum_steps=3)


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulation_gives_the_update_of_the_whole_batch(client, accum):
    pm, ds, start, p0 = client
    ref, ref_terms = run(pm, ds, start)
    p_ref = trainable(pm)
    got, got_terms = run(pm, ds, start, grad_accum_steps=accum)
    err = rel(trainable(pm), p_ref, p0)
    assert got.steps == ref.steps == 3 and got.samples == ref.samples
    assert err < TOL_ACCUM, f"accum {accum}: update error {err:.3g}"
    for a, b in zip(got_terms, ref_terms):  # the reported terms are the whole batch's
        assert a.keys() == b.keys()
        assert all(abs(a[k] - b[k]) <= 1e-5 * abs(b[k]) + 1e-9 for k in a), (a, b)


def test_accumulation_handles_a_short_last_batch(client):
    """One epoch whose last batch is short (and odd): accumulation still matches."""
    pm, ds, start, p0 = client
    bs = 8 if len(ds) % 8 else 6
    assert len(ds) % bs, "the client's dataset must leave a short last batch"
    ref, _ = run(pm, ds, start, steps=0, epochs=1, batch_size=bs)
    p_ref = trainable(pm)
    got, _ = run(pm, ds, start, steps=0, epochs=1, batch_size=bs, grad_accum_steps=2)
    assert got.samples == ref.samples == len(ds)
    err = rel(trainable(pm), p_ref, p0)
    assert err < TOL_ACCUM, f"update error {err:.3g}"


def test_accumulation_weighting_matters(client, monkeypatch):
    """Weighting each micro-batch's ce by its share of the samples (not of the answer
    tokens) must fail the tolerance above: the test can catch the bug it is about."""
    pm, ds, start, p0 = client
    run(pm, ds, start)
    p_ref = trainable(pm)
    monkeypatch.setattr(torch_engine, "answer_tokens", lambda labels: labels.shape[0])
    run(pm, ds, start, grad_accum_steps=2)
    err = rel(trainable(pm), p_ref, p0)
    assert err > 10 * TOL_ACCUM, f"sample-share weighting gave only {err:.3g}"


# ---------------------------------------------------------------------------- checkpointing


def _grads(pm, batch) -> dict[str, torch.Tensor]:
    pm.model.train()
    for p in pm.model.parameters():
        p.grad = None
    out = pm.model(**batch)
    (out.loss + 0.1 * pm.connector.aux["diff"]).backward()
    pm.model.eval()
    return {n: p.grad.clone() for n, p in pm.model.named_parameters() if p.requires_grad}


def test_checkpointing_keeps_every_gradient(client):
    """fp32, dropout off: with non-reentrant checkpointing of the LLM layers, LoRA and the
    connector get exactly the gradients they get without it (the peft + reentrant trap
    would leave LoRA without any)."""
    from pilot_hpc.data.records import collate_train
    from pilot_hpc.train.activations import checkpointing, language_model

    pm, ds, start, _ = client
    pm.set_state(start)
    pm.set_stage(1)
    batch = collate_train([ds[j] for j in range(6)], pm.tokenizer.pad_token_id)
    plain = _grads(pm, batch)
    llm = language_model(pm.model)
    with checkpointing(pm.model, True):
        assert llm.is_activation_checkpointing
        ckpt = _grads(pm, batch)
    assert not llm.is_activation_checkpointing  # off again for evaluation and other rounds
    lora_b = [n for n in plain if "lora_B" in n]  # (B starts at 0, so A's first gradient is 0)
    assert lora_b and all(float(plain[n].abs().sum()) > 0 for n in lora_b)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert torch.equal(plain[n], ckpt[n]), n


def test_checkpointed_round_with_dropout_is_bitwise_the_same(small_world):
    """The recompute restores the RNG state: LoRA dropout draws the same masks."""
    pm, ds, start = build(small_world, dropout=0.05)
    run(pm, ds, start)
    ref = trainable(pm)
    run(pm, ds, start, gradient_checkpointing=True)
    assert torch.equal(trainable(pm), ref)


# ---------------------------------------------------------------------------- fp32 master weights


def _one_step(pm, ds, start, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(task adapter weights before, after) one AdamW step at lr."""
    if start is not None:
        pm.set_state(start)
    before = pm.connector.task_adapter.linear_1.weight.detach().float().clone()
    run(pm, ds, None, steps=1, lr=lr)
    return before, pm.connector.task_adapter.linear_1.weight.detach().float().clone()


def test_bf16_model_keeps_float32_master_weights(small_world):
    pm, ds, start = build(small_world, dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in pm.connector.parameters())
    assert all(p.dtype == torch.float32 for _, p in pm.lora_named_parameters())
    frozen = [p for n, p in pm.model.named_parameters() if "lora_" not in n and "multi_modal_projector" not in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(v.dtype == torch.float32 for k, v in start.items() if v.is_floating_point())  # the personal state


def test_one_small_step_moves_bf16_model_adapters_like_float32(small_world):
    """AdamW at lr 2e-5 moves every adapter weight of a bf16 model by what it moves in
    a float32 model; with the adapters held in bf16 (the old behaviour) the step rounds
    away for most weights (half a bf16 ulp at |w| ~ 0.02 is 6.1e-5 > 2e-5)."""
    lr = 2e-5
    pm32, ds32, s32 = build(small_world)
    b32, a32 = _one_step(pm32, ds32, s32, lr)
    pm16, ds16, s16 = build(small_world, dtype="bfloat16")
    b16, a16 = _one_step(pm16, ds16, s16, lr)
    d32, d16 = a32 - b32, a16 - b16
    # Adam's first step is lr x g / (|g| + eps): lr in size wherever the gradient is not
    # tiny, whatever the forward's precision. bf16 activations change a few gradients'
    # signs; measured here: the updates differ in 0.17% of the weights, and with the
    # adapter itself in bf16 only 30% of its weights move at all.
    moved32 = float((d32 != 0).float().mean())
    assert moved32 > 0.99
    assert float((d16 != 0).float().mean()) > 0.99
    differ = float(((d16 - d32).abs() > 0.5 * lr).float().mean())
    assert differ < 0.02, f"bf16 and fp32 updates differ in {differ:.1%} of the weights"
    # The old behaviour: the adapter itself in bf16.
    pm16.set_state(s16)
    pm16.connector.to(torch.bfloat16)
    try:
        old_b, old_a = _one_step(pm16, ds16, None, lr)
    finally:
        pm16.connector.to(torch.float32)
    moved_old = float((old_a != old_b).float().mean())
    assert moved_old < 0.5, f"bf16 parameters moved in {moved_old:.1%} of the weights"


def test_feddpa_local_lora_is_float32_in_a_bf16_model(small_world):
    from pilot_hpc.config import load_config
    from pilot_hpc.fl.strategies import get_strategy
    from helpers import SMOKE

    cfg, _, _ = small_world
    pm, _, _ = build(small_world, dtype="bfloat16")
    c = load_config(SMOKE, ["fl.strategy=feddpa", "fl.num_clients=3", "fl.client_tasks=[vqa, caption, grounding]",
                            "pilot.top_m=1"])
    get_strategy("feddpa", c).policy.prepare_model(pm)
    local = pm.lora_named_parameters("local")
    assert local and all(p.dtype == torch.float32 for _, p in local)


# ---------------------------------------------------------------------------- attention


def test_attn_implementation_reaches_both_sub_models(small_world):
    pm, _, _ = build(small_world)  # the default
    cfg = pm.model.get_base_model().config
    assert (cfg.text_config._attn_implementation, cfg.vision_config._attn_implementation) == ("sdpa", "sdpa")
    pm, _, _ = build(small_world, attn_implementation="eager")
    cfg = pm.model.get_base_model().config
    assert (cfg.text_config._attn_implementation, cfg.vision_config._attn_implementation) == ("eager", "eager")


def test_flash_attention_without_the_package_is_refused(small_world):
    import importlib.util

    from pilot_hpc.config import ConfigError

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="model.attn_implementation=flash_attention_2 needs the flash-attn"):
        build(small_world, attn_implementation="flash_attention_2")


def test_attn_implementation_is_not_part_of_the_base_key(small_world):
    from pilot_hpc.train.warm_start import base_key

    cfg, _, _ = small_world
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_implementation="eager"))
    assert base_key(other, "k") == base_key(cfg, "k")
    bigger = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_r=4))
    assert base_key(bigger, "k") != base_key(cfg, "k")


# ---------------------------------------------------------------------------- schedule


def test_cosine_schedule_values():
    assert warmup_steps(100, 0.03) == 3 and warmup_steps(3, 0.03) == 1 and warmup_steps(10, 0.0) == 0
    f = [lr_factor(i, 100, "cosine", 0.03) for i in range(100)]
    assert f[:3] == [1 / 3, 2 / 3, 1.0]  # no step at lr 0
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and 0 < f[-1] < 1e-3
    assert abs(lr_factor(3 + 48, 100, "cosine", 0.03) - 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 48 / 97)))) < 1e-6
    assert [lr_factor(i, 5, "constant", 0.5) for i in range(5)] == [1.0] * 5
    with pytest.raises(ValueError, match="constant or cosine"):
        lr_factor(0, 5, "linear", 0.0)


def test_cosine_schedule_changes_the_round(client):
    pm, ds, start, p0 = client
    run(pm, ds, start, steps=4)
    constant = trainable(pm)
    run(pm, ds, start, steps=4, lr_schedule="cosine", warmup_ratio=0.3)
    assert rel(trainable(pm), constant, p0) > 0.05


@pytest.mark.parametrize("workers,accum", [(0, 1), (2, 2)])
def test_interrupted_round_resumes_bitwise_with_the_schedule(small_world, workers, accum):
    """Cosine + warm-up, LoRA dropout on: stopped at step 3 of 6 and resumed equals the
    uninterrupted round bitwise (parameters and every step's losses), also with workers
    and accumulation."""
    pm, ds, start = build(small_world, dropout=0.05)
    opts = dict(steps=6, lr_schedule="cosine", warmup_ratio=0.3, num_workers=workers, grad_accum_steps=accum)
    full, full_terms = run(pm, ds, start, **opts)
    ref = trainable(pm)
    part, part_terms = run(pm, ds, start, should_stop=lambda i: i == 3, **opts)
    assert part.stopped is not None and part.stopped.step == 3
    stop = part.stopped
    stop.torch_rng = stop.torch_rng.clone()
    torch.manual_seed(12345)  # the process's RNG moved on in between (other clients trained)
    rest, rest_terms = run(pm, ds, None, resume=stop, **opts)
    assert rest.steps == full.steps == 6 and rest.samples == full.samples
    assert torch.equal(trainable(pm), ref)
    assert part_terms + rest_terms == full_terms
    assert rest.losses == full.losses


# ---------------------------------------------------------------------------- workers


def test_workers_load_the_same_batches_bitwise(small_world, monkeypatch):
    """LoRA dropout on: a DataLoader drawing its workers' seed from torch's global RNG
    (its default) would shift the dropout masks; this caught it."""
    from pilot_hpc.train import loader

    pm, ds, start = build(small_world, dropout=0.05)
    base, base_terms = run(pm, ds, start, steps=4)
    ref = trainable(pm)
    got, got_terms = run(pm, ds, start, steps=4, num_workers=2)
    assert torch.equal(trainable(pm), ref) and got_terms == base_terms
    first = loader._LOADERS[id(ds)][2]
    pids = sorted(w.pid for w in first._iterator._workers)
    run(pm, ds, start, steps=4, num_workers=2)  # the next round: the same worker processes
    assert loader._LOADERS[id(ds)][2] is first
    assert sorted(w.pid for w in first._iterator._workers) == pids
    assert torch.equal(trainable(pm), ref)
    # Bounded: past MAX_LOADERS datasets the least recently used loader's workers end.
    monkeypatch.setattr(loader, "MAX_LOADERS", 1)
    other = torch.utils.data.Subset(ds, list(range(16)))
    run(pm, other, start, steps=1, num_workers=1)
    assert list(loader._LOADERS) == [id(other)] and first._iterator._workers_status == [False, False]
    loader.close_loaders()


# ---------------------------------------------------------------------------- image pad


def test_pad_to_square_centres_the_image_on_the_mean_colour():
    from pilot_hpc.data.records import pad_to_square

    img = Image.new("RGB", (20, 10), (255, 0, 0))
    mean = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
    sq = pad_to_square(img, mean)
    assert sq.size == (20, 20)
    assert sq.getpixel((0, 0)) == (122, 116, 104) == tuple(int(c * 255) for c in mean)
    assert sq.getpixel((10, 10)) == (255, 0, 0) and sq.getpixel((10, 4)) == (122, 116, 104)
    assert sq.getpixel((10, 5)) == (255, 0, 0) and sq.getpixel((10, 15)) == (122, 116, 104)
    square = Image.new("RGB", (8, 8), (1, 2, 3))
    assert pad_to_square(square, mean) is square


def test_dataset_pad_keeps_the_whole_image(client, tmp_path):
    """A wide image: crop cuts its sides, pad keeps them (so its pixels differ); a
    square image comes out the same either way."""
    from pilot_hpc.data.records import InstructionDataset, Sample

    pm, ds, _, _ = client
    wide = Image.new("RGB", (96, 48), (0, 0, 255))
    wide.paste((255, 255, 0), (0, 0, 16, 48))  # a yellow left edge that crop cuts off
    wide.save(tmp_path / "wide.png")
    Image.new("RGB", (48, 48), (0, 255, 0)).save(tmp_path / "sq.png")
    samples = [Sample("w", str(tmp_path / "wide.png"), [("q", "a")]), Sample("s", str(tmp_path / "sq.png"), [("q", "a")])]
    crop, pad = (InstructionDataset(samples, pm.tokenizer, pm.image_processor, pm.num_image_tokens, 64,
                                    image_aspect_ratio=mode) for mode in ("crop", "pad"))
    assert not torch.equal(crop.pixels(0), pad.pixels(0))
    assert torch.equal(crop.pixels(1), pad.pixels(1))
    # pad: the yellow edge survives in the left columns (red channel high), crop: blue only
    assert float(pad.pixels(0)[0, :, 0].mean()) > float(crop.pixels(0)[0, :, 0].mean()) + 1.0
    with pytest.raises(ValueError, match="data.image_aspect_ratio must be crop or pad"):
        InstructionDataset(samples, pm.tokenizer, pm.image_processor, pm.num_image_tokens, 64,
                           image_aspect_ratio="stretch")


# ---------------------------------------------------------------------------- config


def test_config_keys_and_checks():
    from pilot_hpc.config import ConfigError, load_config, result_fields
    from helpers import SMOKE

    cfg = load_config(SMOKE)
    assert (cfg.model.attn_implementation, cfg.fl.wire_dtype) == ("sdpa", "float32")
    assert load_config(SMOKE, ["model.attn_implementation=eager"]).model.attn_implementation == "eager"
    with pytest.raises(ConfigError, match="model.attn_implementation must be one of"):
        load_config(SMOKE, ["model.attn_implementation=flash"])
    with pytest.raises(ConfigError, match=r"train.batch_size \(16\) must be a multiple of train.grad_accum_steps"):
        load_config(SMOKE, ["train.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match="fl.wire_dtype must be one of"):
        load_config(SMOKE, ["fl.wire_dtype=float16"])
    assert "data.num_workers" not in result_fields(cfg.to_dict())  # workers never change results
    spec = TrainSpec.for_round(load_config(SMOKE, ["train.grad_accum_steps=4", "train.lr_schedule=cosine",
                                                   "train.warmup_ratio=0.03", "train.gradient_checkpointing=true"]
                                           ).train, stage=1, seed=7, num_workers=2)
    assert (spec.grad_accum_steps, spec.micro_batch, spec.lr_schedule, spec.warmup_ratio,
            spec.gradient_checkpointing, spec.num_workers) == (4, 4, "cosine", 0.03, True, 2)


def test_the_baselines_train_at_lr_baseline_or_else_at_lr_stage2():
    """Stage PLAIN (every strategy but pilot) takes train.lr_baseline; at its default (0)
    lr_stage2's value, as Pilot's stage 2 does; Pilot's stages never read it."""
    from helpers import SMOKE
    from pilot_hpc.config import ConfigError, load_config
    from pilot_hpc.model.connector import PLAIN
    from pilot_hpc.train.spec import lr_field

    def lrs(overrides):
        t = load_config(SMOKE, ["train.lr_stage1=1e-3", "train.lr_stage2=2e-3"] + overrides).train
        return [(lr_field(stage, t), TrainSpec.for_round(t, stage=stage, seed=0).lr) for stage in (1, 2, PLAIN)]

    assert lrs([]) == [("lr_stage1", 1e-3), ("lr_stage2", 2e-3), ("lr_stage2", 2e-3)]
    assert lrs(["train.lr_baseline=3e-3"]) == [("lr_stage1", 1e-3), ("lr_stage2", 2e-3), ("lr_baseline", 3e-3)]
    with pytest.raises(ConfigError, match="train.lr_baseline must be >= 0, got -1.0"):
        load_config(SMOKE, ["train.lr_baseline=-1"])


# ---------------------------------------------------------------------------- deepspeed engine
# test_engine.py's tolerance for DeepSpeed vs the torch engine (its docstring has the
# measured numbers: 4.2e-7 at ZeRO 0, 3.5e-7 at ZeRO 2; missing clipping gives 0.21).
TOL_DS = 1e-4


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_accumulation_and_schedule_match_torch(client, zero_stage):
    """DeepSpeed with 2 micro-batches per step and cosine + warm-up against the torch
    engine's whole batches with the same schedule."""
    pm, ds, start, p0 = client
    opts = dict(steps=4, lr_schedule="cosine", warmup_ratio=0.3)
    ref, ref_terms = run(pm, ds, start, **opts)
    p_torch = trainable(pm)
    got, got_terms = run(pm, ds, start, engine="deepspeed", zero_stage=zero_stage, grad_accum_steps=2, **opts)
    err = rel(trainable(pm), p_torch, p0)
    assert got.steps == ref.steps == 4 and err < TOL_DS, f"update error {err:.3g}"
    for a, b in zip(got_terms, ref_terms):
        assert all(abs(a[k] - b[k]) <= 1e-5 * abs(b[k]) + 1e-9 for k in a), (a, b)
    run(pm, ds, start, engine="deepspeed", zero_stage=zero_stage, grad_accum_steps=2, steps=4)  # constant lr
    assert rel(trainable(pm), p_torch, p0) > 100 * TOL_DS  # the schedule reached DeepSpeed's optimiser


def test_deepspeed_keeps_the_float32_masters_of_a_bf16_model(small_world):
    pm, ds, start = build(small_world, dtype="bfloat16")
    before = pm.connector.task_adapter.linear_1.weight.detach().clone()
    res, _ = run(pm, ds, start, engine="deepspeed", zero_stage=0, steps=2)
    assert res.finite and res.steps == 2
    assert all(p.dtype == torch.float32 for p in pm.connector.parameters())
    assert all(p.dtype == torch.float32 for _, p in pm.lora_named_parameters())
    assert not torch.equal(pm.connector.task_adapter.linear_1.weight, before)


DP_CLIENT, DP_BATCH, DP_ACCUM = 1, 3, 3  # 37 samples: global batches of 6, the last of 1 sample


def _dp_accum_worker(rank: int, share_file: str, out: str, cache_dir: str) -> None:
    """One member of a 2-rank client group, 3 micro-batches of 1 sample per step (run as
    a subprocess by the test below)."""
    from helpers import SMOKE, small_overrides
    from test_engine import _share_through
    from pilot_hpc.config import load_config
    from pilot_hpc.data import synthetic
    from pilot_hpc.train.spec import ClientGroup
    from pilot_hpc.train.warm_start import ensure_base

    torch.set_num_threads(1)
    cfg = load_config(SMOKE, small_overrides(cache_dir, os.path.join(cache_dir, "unused")))
    spec = synthetic.spec_for(cfg)
    folder = synthetic.ensure(spec, cache_dir)
    pm, ds, start = build((cfg, folder, ensure_base(cfg, folder, spec.key())), client=DP_CLIENT)
    group = ClientGroup(rank=rank, size=2, share=_share_through(share_file, rank))
    params = [p for p in pm.model.parameters() if p.requires_grad]
    seen = []
    hooks = Hooks(aux_loss=lambda: {"diff": 0.1 * pm.connector.aux["diff"]},
                  progress=lambda s, terms: seen.append({k: float(v.detach()) for k, v in terms.items()}))
    s = TrainSpec(lr=5e-4, batch_size=DP_BATCH, epochs=1, seed=SEED, engine="deepspeed", zero_stage=2,
                  grad_accum_steps=DP_ACCUM, lr_schedule="cosine", warmup_ratio=0.2)
    res = train_steps(pm.model, ds, params, s, pad_id=pm.tokenizer.pad_token_id, hooks=hooks, group=group)
    torch.save({"params": trainable(pm), "steps": res.steps, "samples": res.samples, "seen": seen}, out)


def test_two_ranks_with_accumulation_train_like_one_with_the_whole_batch(small_world, cache_dir, tmp_path):
    """DeepSpeed, 2 ranks x 3 micro-batches of 1 sample vs the torch engine on batches of
    6: the same update (TOL_DP of test_engine.py: 1e-5 over the sum-order 6.1e-7). The
    last batch has 1 sample: rank 0 runs 3 weight-0 micro-batches, rank 1 one real and
    two weight-0 ones."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(__file__)), os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, __file__, "dp-accum-worker", str(r), str(tmp_path / "share.json"),
                               str(tmp_path / f"rank{r}.pt"), cache_dir], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    pm, ds, start = build(small_world, client=DP_CLIENT)
    p0 = trainable(pm)
    ref, ref_terms = run(pm, ds, start, steps=0, epochs=1, batch_size=2 * DP_BATCH, lr_schedule="cosine",
                         warmup_ratio=0.2)
    p_one = trainable(pm)
    for p in procs:
        text, _ = p.communicate(timeout=300)
        assert p.returncode == 0, text[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert len(ds) % (2 * DP_BATCH) == 1
    assert torch.equal(a["params"], b["params"]) and a["seen"] == b["seen"]
    assert a["steps"] == ref.steps and a["samples"] == ref.samples == len(ds)
    err = rel(a["params"], p_one, p0)
    assert err < 1e-5, f"update error {err:.3g}"
    for x, y in zip(a["seen"], ref_terms):
        assert all(abs(x[k] - y[k]) <= 1e-5 * abs(y[k]) + 1e-9 for k in y), (x, y)


if __name__ == "__main__" and sys.argv[1:2] == ["dp-accum-worker"]:
    _dp_accum_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
