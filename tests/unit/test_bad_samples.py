"""data.on_bad_sample: a training sample that cannot be read at run time (its image does
not decode) is named (file and record), then skipped and counted, or the round stops
before the step that needs it, and a rerun after the fix continues bitwise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import build_client, trainable
from pilot_hpc.data.records import InstructionDataset, collate_train
from pilot_hpc.errors import DataError
from pilot_hpc.train.engines import train_steps
from pilot_hpc.train.spec import Hooks, TrainSpec, batches

SEED, BATCH, STEPS = 3, 8, 6


@pytest.fixture(scope="module")
def client(small_world, tmp_path_factory):
    torch.set_num_threads(1)
    pm, ds, start = build_client(small_world)
    broken = tmp_path_factory.mktemp("broken") / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not an image")  # a PNG signature, then nothing decodable
    plan = list(batches(len(ds), BATCH, 100, STEPS, torch.Generator().manual_seed(SEED)))  # the engines' draw
    return pm, ds, start, str(broken), plan


def with_broken(ds, bad: set[int], broken: str) -> InstructionDataset:
    """ds with the images of samples `bad` replaced by the undecodable file."""
    samples = [dataclasses.replace(s, image_path=broken) if i in bad else s for i, s in enumerate(ds.samples)]
    return InstructionDataset(samples, ds.tok, ds.proc, ds.num_image_tokens, ds.max_length)


def run(pm, ds, start, *, resume=None, engine="torch", **spec):
    if start is not None:
        pm.set_state(start)
    pm.set_stage(1)
    params = [p for p in pm.model.parameters() if p.requires_grad]
    s = TrainSpec(lr=5e-4, batch_size=BATCH, epochs=100, max_steps=STEPS, seed=SEED, engine=engine, **spec)
    hooks = Hooks(aux_loss=lambda: {"diff": 0.1 * pm.connector.aux["diff"]})
    return train_steps(pm.model, ds, params, s, pad_id=pm.tokenizer.pad_token_id, hooks=hooks, resume=resume)


def test_an_unreadable_sample_is_named_and_left_out_of_its_batch(client):
    pm, ds, _, broken, _ = client
    bad = with_broken(ds, {3}, broken)
    item = bad[3]
    assert set(item) == {"unreadable"}
    assert "client_00_train.json: record 3 (id 'client_00_train-000003'): image" in item["unreadable"]
    assert "cannot be decoded" in item["unreadable"]
    batch = collate_train([bad[0], bad[3], bad[1]], pm.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["unreadable"] == [item["unreadable"]]
    assert collate_train([bad[3]], pm.tokenizer.pad_token_id) == {"unreadable": [item["unreadable"]]}
    assert "unreadable" not in collate_train([bad[0]], pm.tokenizer.pad_token_id)  # a good batch: no "unreadable" key
    with pytest.raises(DataError, match=r"record 3 \(id 'client_00_train-000003'\): image .* cannot be decoded"):
        bad.check(3)


@pytest.mark.parametrize("engine,accum,workers", [("torch", 1, 0), ("torch", 2, 2), ("deepspeed", 1, 0)])
def test_skip_counts_every_draw_and_trains_on_the_rest(client, engine, accum, workers):
    """One bad sample of step 0 and the whole batch of step 1: every draw of them is
    counted, the rest trains (a step left with nothing takes no update but counts);
    with DataLoader workers the messages come through the workers' collate."""
    pm, ds, start, broken, plan = client
    bad = {plan[0][0]} | set(plan[1])
    draws = sum(j in bad for step in plan for j in step)
    if engine == "deepspeed":  # a micro-batch with nothing left stops a deepspeed group instead (below)
        bad = {plan[0][0]}
        draws = sum(j in bad for step in plan for j in step)
    extra = {"zero_stage": 0} if engine == "deepspeed" else {}
    res = run(pm, with_broken(ds, bad, broken), start, engine=engine, on_bad_sample="skip", grad_accum_steps=accum,
              num_workers=workers, **extra)
    assert res.stopped is None and res.finite and res.steps == STEPS
    assert res.skipped == draws > 0
    if engine == "torch":
        assert res.samples == BATCH * STEPS - draws
    assert all(torch.isfinite(p).all() for p in pm.model.parameters())


def test_a_deepspeed_micro_batch_with_nothing_readable_stops_the_round_naming_it(client):
    pm, ds, start, broken, plan = client
    res = run(pm, with_broken(ds, set(plan[1]), broken), start, engine="deepspeed", zero_stage=0,
              on_bad_sample="skip")
    assert res.stopped is not None and res.stopped.step == 0 and res.steps == 1  # restart semantics
    assert "every sample of a micro-batch of step 1 is unreadable" in res.bad_sample
    assert "cannot be decoded" in res.bad_sample


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_fail_stops_before_the_step_and_the_fixed_rerun_continues_bitwise(client, engine):
    pm, ds, start, broken, plan = client
    j = next(i for i in plan[2] if all(i not in step for step in plan[:2]))  # first needed at step 2
    extra = {"zero_stage": 0} if engine == "deepspeed" else {}
    clean = run(pm, ds, start, engine=engine, **extra)
    want = trainable(pm)
    res = run(pm, with_broken(ds, {j}, broken), start, engine=engine, on_bad_sample="fail", **extra)
    assert res.stopped is not None and res.steps == 2
    assert f"record {j} (id 'client_00_train-{j:06d}')" in res.bad_sample
    # The image fixed, the run continues from where it stopped: the torch engine at step 2
    # with its optimiser state, the deepspeed engine from the round's start (its restart).
    if engine == "torch":
        assert res.stopped.step == 2
        again = run(pm, ds, None, engine=engine, resume=res.stopped, **extra)
    else:
        assert res.stopped.step == 0
        again = run(pm, ds, start, engine=engine, resume=res.stopped, **extra)
    assert again.stopped is None and again.skipped == 0 and again.losses == clean.losses
    assert torch.equal(trainable(pm), want)
